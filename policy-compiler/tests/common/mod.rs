//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

use policy_compiler::{Policy, PolicyError, PolicyErrors};

/// The example hospital policy shipped in `segments/`.
pub fn example_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../segments")
}

/// The example policy's files as (`segments/NAME.yaml`, content), sorted.
pub fn example_sources() -> Vec<(String, String)> {
    let mut sources = Vec::new();
    for entry in std::fs::read_dir(example_dir()).expect("segments/ is readable") {
        let path = entry.expect("directory entry").path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if path.is_file() && (name.ends_with(".yaml") || name.ends_with(".yml")) {
            let text = std::fs::read_to_string(&path).expect("policy file is UTF-8");
            sources.push((format!("segments/{name}"), text));
        }
    }
    sources.sort();
    sources
}

pub fn example_policy() -> Policy {
    Policy::load_dir(&example_dir()).unwrap_or_else(|e| panic!("example policy is invalid:\n{e}"))
}

pub fn source(file: &str, text: &str) -> (String, String) {
    (file.to_string(), text.to_string())
}

/// The errors of a policy that must not validate.
pub fn errors_of(sources: &[(String, String)]) -> Vec<PolicyError> {
    match Policy::from_sources(sources) {
        Ok(_) => panic!("policy unexpectedly valid"),
        Err(PolicyErrors(errors)) => {
            assert!(!errors.is_empty());
            errors
        }
    }
}

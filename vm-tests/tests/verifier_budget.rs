//! The kernel programs stay well inside the verifier's limit of 1,000,000 instructions processed
//! per program. A change that crossed it would fail to load on every host, and the count rises
//! with every branch whose outcome the verifier can tell apart (see "What the verifier walks" in
//! `docs/design.md`), so the margin is checked here, not discovered at a rollout. Needs root.
use enforcer::Enforcer;
use enforcer_common::program_names;
use policy_compiler::Policy;

/// About a third of the limit. Before scratch memory hid header offsets and decisions from the
/// verifier the XDP program cost 542,000 (6.18) and 565,000 (6.1); since, 199,000 and 264,000.
const BUDGET: u32 = 350_000;

#[test]
fn each_program_stays_within_a_third_of_the_verifier_limit() {
    let dir = vm_tests::lab::example_policy_dir();
    let policy = Policy::load_dir(&dir).unwrap_or_else(|e| panic!("example policy: {e}"));
    let artifact = policy_compiler::compile(&policy).expect("compile the example policy");
    let enforcer = Enforcer::load(&artifact).expect("load the enforcer");
    for name in [program_names::XDP_INGRESS, program_names::TC_EGRESS] {
        let program = enforcer
            .ebpf()
            .program(name)
            .unwrap_or_else(|| panic!("no program {name}"));
        let processed = program
            .info()
            .expect("program info")
            .verified_instruction_count()
            .expect("the kernel reports the instructions its verifier processed (Linux 5.16+)");
        println!("{name}: the verifier processed {processed} instructions");
        assert!(
            processed <= BUDGET,
            "{name}: the verifier processed {processed} instructions, over the budget of \
             {BUDGET} (its limit is 1,000,000): find the branch whose outcome it now tells \
             apart and make the value opaque (`packet::opaque`), or split the path"
        );
    }
}

//! End-to-end quarantine: real daemons in a lab, real TCP, the `enforcer quarantine` CLI over
//! each daemon's control socket. A radiology workstation that reaches the PACS is quarantined;
//! at once its new connections are denied and its established one is cut, it reaches only the
//! remediation server (what `from: quarantine` allows), and only the remediation server reaches
//! it (quarantine.yaml). The audit log has the record and verifies, and stops verifying once a
//! record is edited. The quarantine survives a daemon restart; `quarantine remove` restores the
//! workstation's segment.
//!
//! Each enforcer keeps its own quarantine list: the workstation is quarantined on every daemon
//! that judges its traffic (the PACS's, the remediation server's, its own), as an operator's
//! fleet tooling would.
//!
//! Needs root and a kernel with XDP; `cargo xtask test` provides both and sets `ENFORCER_BIN`.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    path::Path,
    process::Output,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use serde_json::Value;
use vm_tests::lab::{Enforcer, HostSpec, Lab, example_policy_dir, init_test};

const PROBE: Duration = Duration::from_millis(900);
const REASON: &str = "EDR agent missing";

fn run(mut cmd: std::process::Command) -> Result<Output> {
    let output = cmd.output().context("running the enforcer CLI")?;
    Ok(output)
}

/// `enforcer ARGS --control-socket <daemon's>`; its stdout, or an error with its stderr.
fn cli(enforcer: &Enforcer<'_>, args: &[&str]) -> Result<String> {
    let output = run(enforcer.control_command(args))?;
    ensure!(
        output.status.success(),
        "`enforcer {}` on {} failed ({}): {}",
        args.join(" "),
        enforcer.host(),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn quarantined_list(enforcer: &Enforcer<'_>) -> Result<Vec<String>> {
    let list: Value =
        serde_json::from_str(&cli(enforcer, &["quarantine", "list", "--output", "json"])?)?;
    Ok(list["quarantined"]
        .as_array()
        .context("quarantined list")?
        .iter()
        .filter_map(|entry| entry["address"].as_str().map(str::to_string))
        .collect())
}

/// A connection that echoes: `true` while bytes written come back.
fn echoes(stream: &mut TcpStream) -> bool {
    let mut back = [0u8; 4];
    stream.write_all(b"ping").is_ok() && stream.read_exact(&mut back).is_ok() && &back == b"ping"
}

fn audit_verify(file: &Path) -> Result<Output> {
    let mut cmd = std::process::Command::new(vm_tests::lab::enforcer_bin()?);
    cmd.args(["audit", "verify"]).arg(file);
    run(cmd)
}

#[test]
fn a_quarantined_host_is_isolated_in_seconds_and_stays_isolated() -> Result<()> {
    init_test();
    let policy = example_policy_dir();
    let lab = Lab::new(&[
        HostSpec::clinical("pacs", "pacs", 10),
        HostSpec::clinical("radiology-ws", "radiology", 20),
        HostSpec::new(
            "remediation",
            Some("remediation"),
            Ipv4Addr::new(10, 80, 0, 10),
            Ipv6Addr::new(0xfd00, 0x80, 0, 0, 0, 0, 0, 0x10),
        ),
    ])?;
    let ws = lab.host("radiology-ws")?.clone();
    let (ws_v4, ws_v6) = (IpAddr::from(ws.v4), IpAddr::from(ws.v6));
    let pacs = IpAddr::from(lab.host("pacs")?.v4);
    let pacs_v6 = IpAddr::from(lab.host("pacs")?.v6);
    let remediation = IpAddr::from(lab.host("remediation")?.v4);
    let _pacs_services = lab.serve("pacs", &[104], &[])?;
    let _remediation_services = lab.serve("remediation", &[443], &[])?;
    let _ws_services = lab.serve("radiology-ws", &[104, 22], &[])?;
    let mut daemons = lab.start_enforcers(&["pacs", "radiology-ws", "remediation"], &policy)?;

    // Healthy: the workstation and the PACS reach each other; the remediation server has no
    // way in.
    ensure!(
        lab.tcp_connect("radiology-ws", pacs, 104, PROBE),
        "ws -> pacs tcp/104 before"
    );
    ensure!(
        lab.tcp_connect("pacs", ws_v4, 104, PROBE),
        "pacs -> ws tcp/104 before"
    );
    ensure!(
        !lab.tcp_connect("remediation", ws_v4, 22, PROBE),
        "remediation reached the healthy workstation on tcp/22"
    );
    let mut established = lab
        .in_host("radiology-ws", move || {
            TcpStream::connect_timeout(&SocketAddr::new(pacs, 104), Duration::from_secs(2))
        })?
        .context("opening the established DICOM connection")?;
    established.set_read_timeout(Some(Duration::from_millis(1500)))?;
    established.set_write_timeout(Some(Duration::from_millis(1500)))?;
    ensure!(
        echoes(&mut established),
        "the established connection echoes before"
    );

    // Quarantine on the PACS's daemon first: the established connection goes through it.
    let started = Instant::now();
    let out = cli(
        &daemons[0],
        &["quarantine", "add", &ws_v4.to_string(), "--reason", REASON],
    )?;
    let took = started.elapsed();
    ensure!(out.contains("quarantined"), "unexpected output: {out}");
    ensure!(
        !echoes(&mut established),
        "the workstation's established connection to the PACS was not cut"
    );
    ensure!(
        !lab.tcp_connect("radiology-ws", pacs, 104, PROBE),
        "a new connection ws -> pacs tcp/104 passed right after `quarantine add` returned"
    );
    eprintln!(
        "`enforcer quarantine add` returned after {took:?}: {}",
        out.trim()
    );
    // Again: nothing changes, and it says so.
    let again = cli(
        &daemons[0],
        &["quarantine", "add", &ws_v4.to_string(), "--reason", REASON],
    )?;
    ensure!(again.contains("already quarantined"), "{again}");

    // The other daemons, and the workstation's IPv6 address everywhere.
    for daemon in &daemons[1..] {
        cli(
            daemon,
            &["quarantine", "add", &ws_v4.to_string(), "--reason", REASON],
        )?;
    }
    for daemon in &daemons {
        cli(
            daemon,
            &["quarantine", "add", &ws_v6.to_string(), "--reason", REASON],
        )?;
    }
    check_isolated(&lab, ws_v4, pacs, remediation)?;
    ensure!(
        !lab.tcp_connect("radiology-ws", pacs_v6, 104, PROBE),
        "ws -> pacs tcp/104 over IPv6 while quarantined"
    );
    for daemon in &daemons {
        let list = quarantined_list(daemon)?;
        ensure!(
            list == [ws_v4.to_string(), ws_v6.to_string()],
            "{}: quarantine list {list:?}",
            daemon.host()
        );
    }
    let metrics = daemons[0].metrics()?;
    ensure!(
        metrics.get("enforcer_quarantined_hosts", &[]) == Some(2.0),
        "enforcer_quarantined_hosts:\n{metrics}"
    );
    // The PACS's denials of the workstation name the quarantine segment.
    let flows = daemons[0].http_get("/flows?follow=false&from=quarantine&to=pacs", PROBE)?;
    ensure!(
        flows
            .lines()
            .any(|line| line.contains("\"verdict\":\"deny\"")),
        "no denied flow from the quarantine segment in /flows:\n{flows}"
    );

    // The audit log: the record, with who and why; the chain verifies, an edited copy does not.
    let audit_log = daemons[0].files().audit_log.clone();
    let text = std::fs::read_to_string(&audit_log)?;
    let record = text
        .lines()
        .find(|line| line.contains("\"kind\":\"quarantine_add\""))
        .context("no quarantine_add record")?;
    let record: Value = serde_json::from_str(record)?;
    ensure!(
        record["address"] == ws_v4.to_string()
            && record["reason"] == REASON
            && record["actor"]["user"] == "root"
            && record["actor"]["uid"] == 0,
        "quarantine_add record: {record}"
    );
    let verify = audit_verify(&audit_log)?;
    ensure!(
        verify.status.code() == Some(0),
        "audit verify of the live log: {}",
        String::from_utf8_lossy(&verify.stdout)
    );
    let edited = lab.run_dir().join("audit-edited.jsonl");
    let line = text
        .lines()
        .position(|line| line.contains("\"kind\":\"quarantine_add\""))
        .unwrap_or_default();
    std::fs::write(&edited, text.replacen(REASON, "routine maintenance", 1))?;
    let verify = audit_verify(&edited)?;
    let report = String::from_utf8_lossy(&verify.stdout);
    ensure!(
        verify.status.code() == Some(1)
            && report.contains(&format!("line {} (seq", line + 1))
            && report.contains("was edited"),
        "audit verify of an edited copy (record on line {}): {report}",
        line + 1
    );

    // Restart the PACS's and the workstation's daemons (same state files): still isolated.
    let ws_daemon = daemons.remove(1);
    let pacs_daemon = daemons.remove(0);
    pacs_daemon.stop().context("stopping the pacs daemon")?;
    ws_daemon
        .stop()
        .context("stopping the workstation's daemon")?;
    let pacs_daemon = lab.start_enforcer("pacs", &policy)?;
    let ws_daemon = lab.start_enforcer("radiology-ws", &policy)?;
    ensure!(
        pacs_daemon.wait_for_log("quarantined hosts restored", Duration::from_secs(1)),
        "the restarted daemon did not restore the quarantine:\n{}",
        pacs_daemon.stderr()
    );
    check_isolated(&lab, ws_v4, pacs, remediation)?;
    ensure!(
        quarantined_list(&pacs_daemon)? == [ws_v4.to_string(), ws_v6.to_string()],
        "the quarantine list after a restart"
    );

    // Release: its segment again, for new connections, both ways.
    let daemons = [pacs_daemon, ws_daemon, daemons.remove(0)];
    for daemon in &daemons {
        for addr in [ws_v4, ws_v6] {
            let out = cli(
                daemon,
                &[
                    "quarantine",
                    "remove",
                    &addr.to_string(),
                    "--reason",
                    "EDR reinstalled",
                ],
            )?;
            ensure!(out.contains("released"), "{out}");
        }
        ensure!(
            quarantined_list(daemon)?.is_empty(),
            "{} list",
            daemon.host()
        );
    }
    ensure!(
        lab.tcp_connect("radiology-ws", pacs, 104, PROBE),
        "ws -> pacs after release"
    );
    ensure!(
        lab.tcp_connect("pacs", ws_v4, 104, PROBE),
        "pacs -> ws after release"
    );
    ensure!(
        !lab.tcp_connect("remediation", ws_v4, 22, PROBE),
        "remediation -> ws tcp/22 after release"
    );
    let output = run(daemons[0].control_command(&["quarantine", "remove", &ws_v4.to_string()]))?;
    ensure!(
        output.status.code() == Some(1)
            && String::from_utf8_lossy(&output.stderr).contains("is not quarantined"),
        "removing twice: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let pacs_log = daemons[0].files().audit_log.clone();
    let text = std::fs::read_to_string(&pacs_log)?;
    ensure!(
        text.contains("\"kind\":\"quarantine_remove\"")
            && text.contains("\"kind\":\"daemon_stop\"")
            && audit_verify(&pacs_log)?.status.code() == Some(0),
        "the pacs audit log after the restart and the release:\n{text}"
    );
    for daemon in daemons {
        daemon.stop()?;
    }
    // At stop the daemon audits the denials since the last summary: the restarted PACS daemon
    // denied the quarantined workstation.
    let text = std::fs::read_to_string(&pacs_log)?;
    let summary: Value = text
        .lines()
        .rfind(|line| line.contains("\"kind\":\"violations_summary\""))
        .map(serde_json::from_str)
        .context("no violations_summary record")??;
    let from_quarantine = summary["pairs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|pair| pair["from"] == "quarantine" && pair["to"] == "pacs")
        .filter_map(|pair| pair["denied"].as_u64())
        .sum::<u64>();
    ensure!(
        from_quarantine > 0 && summary["denied_total"].as_u64() >= Some(from_quarantine),
        "the last violations summary does not count the quarantine -> pacs denials: {summary}"
    );
    let verify = audit_verify(&pacs_log)?;
    ensure!(
        verify.status.code() == Some(0),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
    Ok(())
}

/// The isolation, from every side.
fn check_isolated(lab: &Lab, ws: IpAddr, pacs: IpAddr, remediation: IpAddr) -> Result<()> {
    let cases = [
        ("radiology-ws", pacs, 104, false, "ws -> pacs tcp/104"),
        (
            "pacs",
            ws,
            104,
            false,
            "pacs -> ws tcp/104 (its own daemon)",
        ),
        (
            "radiology-ws",
            remediation,
            443,
            true,
            "ws -> remediation tcp/443",
        ),
        ("remediation", ws, 22, true, "remediation -> ws tcp/22"),
    ];
    let mut wrong = Vec::new();
    for (from, to, port, want, what) in cases {
        if lab.tcp_connect(from, to, port, PROBE) != want {
            wrong.push(format!(
                "{what}: expected {}",
                if want { "allowed" } else { "denied" }
            ));
        }
    }
    if !wrong.is_empty() {
        bail!("while quarantined: {}", wrong.join("; "));
    }
    Ok(())
}

//! The command line a person reads: one-line summaries in `--help`, the
//! paragraph under `walgraph CMD --help`, shell completions and the manual
//! page generated from the same definitions.

use std::process::Command;

const COMMANDS: [&str; 12] = [
    "setup",
    "snapshot",
    "replay",
    "reconcile",
    "run",
    "peek",
    "status",
    "bench",
    "mapping",
    "teardown",
    "completions",
    "man",
];

fn walgraph(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_walgraph"))
        .args(args)
        .env_remove("WALGRAPH_CONFIG")
        .output()
        .expect("run walgraph");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn help_lists_each_command_on_one_line_and_its_help_has_the_paragraph() {
    let (ok, help) = walgraph(&["--help"]);
    assert!(ok, "{help}");
    let listed: Vec<&str> = help
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .collect();
    for cmd in COMMANDS {
        let line = listed
            .iter()
            .find(|l| l.split_whitespace().next() == Some(cmd))
            .unwrap_or_else(|| panic!("{cmd} is not listed: {help}"));
        assert!(
            line.len() <= 100 && !line.trim_end().ends_with('.'),
            "a one-line summary, not a paragraph: {line:?}"
        );
    }
    let (ok, setup) = walgraph(&["setup", "--help"]);
    assert!(ok && setup.contains("Safe to run again"), "{setup}");
}

#[test]
fn completions_for_bash_zsh_and_fish_name_every_command() {
    for shell in ["bash", "zsh", "fish"] {
        let (ok, script) = walgraph(&["completions", shell]);
        assert!(ok, "{shell}: {script}");
        for cmd in COMMANDS {
            assert!(script.contains(cmd), "{shell} completion lacks {cmd}");
        }
    }
    let (_, bash) = walgraph(&["completions", "bash"]);
    let dir = std::env::temp_dir().join(format!("walgraph-completion-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("walgraph.bash");
    std::fs::write(&file, bash).expect("write");
    let check = Command::new("bash")
        .arg("-n")
        .arg(&file)
        .output()
        .expect("bash -n");
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_manual_page_is_roff_with_every_command() {
    let (ok, man) = walgraph(&["man"]);
    assert!(ok, "{man}");
    assert!(man.contains(".TH walgraph 1"), "{man}");
    for cmd in COMMANDS {
        assert!(man.contains(cmd), "the manual page lacks {cmd}");
    }
    // Needs no configuration, not even a readable one.
    let (ok, _) = walgraph(&["--config", "/nonexistent/walgraph.toml", "man"]);
    assert!(ok, "man reads no configuration");
}

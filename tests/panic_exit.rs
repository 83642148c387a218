//! A panic inside any task ends the process with a non-zero status (70), so a
//! supervisor restarts it, instead of leaving it alive and doing nothing. The test runs
//! itself again as a child process that installs the binary's panic hook and panics in
//! a spawned task, then checks how the child ended.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;
use std::time::Duration;

const CHILD: &str = "BYOC_SIDECAR_PANIC_CHILD";

#[test]
fn a_panic_in_a_spawned_task_ends_the_process_with_status_70() {
    if std::env::var_os(CHILD).is_some() {
        byoc_sidecar::fatal::exit_on_panic();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            tokio::spawn(async { panic!("a task fails") });
            // Without the hook tokio swallows the panic and the process lives on.
            tokio::time::sleep(Duration::from_secs(3)).await;
        });
        std::process::exit(0);
    }
    let output = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "a_panic_in_a_spawned_task_ends_the_process_with_status_70",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(byoc_sidecar::fatal::EXIT_PANIC),
        "child stderr:\n{stderr}"
    );
    assert!(stderr.contains("internal error (panic)"), "{stderr}");
    assert!(
        !stderr.contains("a task fails"),
        "the panic message must not be printed: {stderr}"
    );
}

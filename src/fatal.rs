//! A panic anywhere ends the process. Tokio catches a panic inside a spawned task and
//! carries on without it, which would leave the proxy half alive: an engine that no
//! longer turns, or a listener that no longer reads, behind a process that looks up to
//! its supervisor. [`exit_on_panic`] makes every panic fatal instead, with
//! [`EXIT_PANIC`], so systemd, Kubernetes or Docker restart a whole sidecar.

/// Exit status after a panic (EX_SOFTWARE of sysexits.h: an internal software error).
pub const EXIT_PANIC: i32 = 70;

/// Installs a panic hook that logs where the panic happened and ends the process with
/// [`EXIT_PANIC`]. The panic's message is not logged: it could quote data the panicking
/// code held (a credential source's response, say).
pub fn exit_on_panic() {
    use std::io::Write as _;
    std::panic::set_hook(Box::new(|info| {
        let location = info
            .location()
            .map(|location| format!("{}:{}", location.file(), location.line()))
            .unwrap_or_else(|| "unknown location".into());
        let thread = std::thread::current()
            .name()
            .unwrap_or("unnamed")
            .to_string();
        tracing::error!(%location, %thread, "internal error (panic); exiting so the supervisor restarts the sidecar");
        // Not eprintln!: it panics when stderr is closed, which inside the hook would
        // abort the process with another status.
        let _ = writeln!(
            std::io::stderr(),
            "byoc-sidecar: internal error (panic) at {location} in thread {thread}; exiting with status {EXIT_PANIC}"
        );
        std::process::exit(EXIT_PANIC);
    }));
}

//! A credential in a file that an external agent rewrites (Vault Agent, a Kubernetes
//! secret mount, a cron job): either a token, or a username on the first line and a
//! password on the second.
//!
//! The file is polled (`stat` through any symlinks) every `poll` interval, which sees
//! both ways files get replaced: rewritten in place (size or modification time change)
//! and swapped atomically by rename or by re-pointing a symlink, as Kubernetes does with
//! its `..data` link (the inode changes). A change makes the manager read it again.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{CredentialValue, FetchError, FetchFuture, Fetched, Secret, Source};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileFormat {
    /// The whole file, trimmed, is a bearer token.
    Token,
    /// Line 1 the username, line 2 the password.
    UsernamePassword,
}

#[derive(Debug)]
pub struct FileSource {
    path: PathBuf,
    format: FileFormat,
    changes: watch::Receiver<u64>,
}

/// What identifies one version of a file: device, inode, size, modification time.
type Signature = Option<(u64, u64, u64, i64, i64)>;

fn signature(path: &Path) -> Signature {
    let metadata = std::fs::metadata(path).ok()?;
    Some((
        metadata.dev(),
        metadata.ino(),
        metadata.size(),
        metadata.mtime(),
        metadata.mtime_nsec(),
    ))
}

impl FileSource {
    /// Starts polling `path`; the poller stops with `cancel`.
    pub fn start(
        path: PathBuf,
        format: FileFormat,
        poll: Duration,
        cancel: CancellationToken,
        tracker: &TaskTracker,
    ) -> Self {
        let (sender, changes) = watch::channel(0u64);
        let watched = path.clone();
        tracker.spawn(async move {
            let mut last = signature(&watched);
            let mut ticker = tokio::time::interval(poll);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = ticker.tick() => {}
                }
                let current = signature(&watched);
                if current != last {
                    last = current;
                    sender.send_modify(|count| *count += 1);
                }
            }
        });
        Self {
            path,
            format,
            changes,
        }
    }

    fn read(&self) -> Result<Fetched, FetchError> {
        read_credential(&self.path, self.format)
    }
}

/// Reads a credential file once, by the watching source's rules (`check --online`).
pub fn read_credential(path: &std::path::Path, format: FileFormat) -> Result<Fetched, FetchError> {
    let shown = path.display();
    let text = std::fs::read_to_string(path).map_err(|error| FetchError::Transient {
        reason: format!("cannot read credential file {shown}: {error}"),
        retry_after: None,
    })?;
    // An in-place rewrite can be caught half done; an empty or short file is retried.
    let incomplete = |what: &str| FetchError::Transient {
        reason: format!("credential file {shown} {what}"),
        retry_after: None,
    };
    let value = match format {
        FileFormat::Token => {
            let token = text.trim();
            if token.is_empty() {
                return Err(incomplete("is empty"));
            }
            CredentialValue::Token(Secret::new(token))
        }
        FileFormat::UsernamePassword => {
            let mut lines = text.lines().map(str::trim).filter(|line| !line.is_empty());
            let (Some(username), Some(password)) = (lines.next(), lines.next()) else {
                return Err(incomplete("needs a username line and a password line"));
            };
            CredentialValue::UserPassword {
                username: username.to_string(),
                password: Secret::new(password),
            }
        }
    };
    Ok(Fetched {
        value,
        lifetime: None,
        granted_scopes: None,
    })
}

impl Source for FileSource {
    fn fetch(&self) -> FetchFuture<'_> {
        let result = self.read();
        Box::pin(async move { result })
    }

    fn changes(&self) -> Option<watch::Receiver<u64>> {
        Some(self.changes.clone())
    }

    fn describe(&self) -> String {
        format!("file {}", self.path.display())
    }
}

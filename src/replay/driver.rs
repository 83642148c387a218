//! The replay driver: reads the capture, plays the Edge side of every dialogue against
//! the target and, with `core`, the core side on a local listener (both in
//! [`super::endpoint`]), and turns the players' ladders into a [`Report`].

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::capture::CaptureError;
use super::endpoint::{Endpoint, Sockets};
use super::extract::{read, Filter};
use super::player::{Outcome, Pacing, Player};
use super::report::{differences, DialogueReport, Ladder, Report, SideReport, Verdict};
use super::script::{dialogues, Dialogue, Side};
use crate::config::Transport;

/// How long the core side may go on after the Edge side finished.
const CORE_GRACE: Duration = Duration::from_secs(2);

#[derive(Debug, Clone)]
pub struct ReplayOptions {
    pub capture: PathBuf,
    pub target: SocketAddr,
    /// Every dialogue over this transport; `None`: as captured.
    pub transport: Option<Transport>,
    /// Our address in Via and Contact; `None`: the one the route to the target uses.
    pub local_ip: Option<IpAddr>,
    /// Play the core side from the capture, listening here (UDP and TCP).
    pub core: Option<SocketAddr>,
    pub pacing: Pacing,
    pub filter: Filter,
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Capture(#[from] CaptureError),
    #[error("{path} holds no SIP dialogue{filtered}")]
    NoDialogues {
        path: PathBuf,
        filtered: &'static str,
    },
    #[error("cannot listen on {address}: {source}")]
    Bind {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("no local address routes to {target}: {source}")]
    NoRoute {
        target: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{address} is not a specific address: it goes into Via and Contact")]
    Unspecified { address: IpAddr },
}

/// Runs a replay to its end (or until `cancel`) and reports.
pub async fn replay(
    options: &ReplayOptions,
    cancel: &CancellationToken,
) -> Result<Report, ReplayError> {
    let extraction = read(&options.capture, &options.filter)?;
    let (found, without_call_id) = dialogues(extraction.messages, &options.filter.call_ids);
    let mut reader = extraction.stats;
    reader.sip_without_call_id = without_call_id as u64;
    if found.is_empty() {
        let filtered = if options.filter.call_ids.is_empty()
            && options.filter.ports.is_empty()
            && options.filter.from.is_none()
            && options.filter.until.is_none()
        {
            ""
        } else {
            " that passes the filters"
        };
        return Err(ReplayError::NoDialogues {
            path: options.capture.clone(),
            filtered,
        });
    }
    let dialogues: Vec<Arc<Dialogue>> = found.into_iter().map(Arc::new).collect();
    let run = format!("{:08x}", rand::random::<u32>());
    let local_ip = match options.local_ip {
        Some(ip) => ip,
        None => route_to(options.target)?,
    };
    for address in [Some(local_ip), options.core.map(|core| core.ip())]
        .into_iter()
        .flatten()
    {
        if address.is_unspecified() {
            return Err(ReplayError::Unspecified { address });
        }
    }
    let core_cancel = cancel.child_token();
    let core_task = match options.core {
        Some(listen) => {
            let sockets = Sockets::bind(listen).await?;
            let endpoint = Endpoint::new(Side::Core, sockets, &dialogues, &run, options);
            let token = core_cancel.clone();
            Some(tokio::spawn(async move { endpoint.run(token).await }))
        }
        None => None,
    };
    let edge_sockets = Sockets::bind(SocketAddr::new(local_ip, 0)).await?;
    let edge = Endpoint::new(Side::Edge, edge_sockets, &dialogues, &run, options);
    let mut edge_players = edge.run(cancel.clone()).await;
    let mut core_players = HashMap::new();
    if let Some(task) = core_task {
        // The core side may still be answering the last messages.
        tokio::select! {
            _ = tokio::time::sleep(CORE_GRACE) => {}
            _ = cancel.cancelled() => {}
        }
        core_cancel.cancel();
        match task.await {
            Ok(players) => core_players = players,
            // Reported as a core side that never played.
            Err(error) => tracing::warn!(error = %error, "replay: the core side's task failed"),
        }
    }
    let mut reports = Vec::new();
    for (index, dialogue) in dialogues.iter().enumerate() {
        let mut edge_side = side_report(dialogue, Side::Edge, edge_players.remove(&index));
        let core_side = options
            .core
            .map(|_| side_report(dialogue, Side::Core, core_players.remove(&index)));
        // Nothing of it reached the core we play: whatever the Edge saw, the dialogue
        // did not happen as captured (a hop in between dropped it).
        if core_side.as_ref().map(|core| core.verdict) == Some(Verdict::NotPlayed)
            && edge_side.verdict == Verdict::Matched
        {
            edge_side.verdict = Verdict::TimedOut;
            edge_side
                .notes
                .push("the core side never received this dialogue".into());
        }
        reports.push(DialogueReport {
            call_id: dialogue.call_id.clone(),
            transport: options.transport.unwrap_or(dialogue.transport).to_string(),
            edge: dialogue.edge.to_string(),
            core: dialogue.core.to_string(),
            other_legs: dialogue.other_legs,
            edge_side,
            core_side,
        });
    }
    Ok(Report::new(
        options.capture.display().to_string(),
        options.target.to_string(),
        reader,
        reports,
    ))
}

fn side_report(dialogue: &Dialogue, role: Side, player: Option<Player>) -> SideReport {
    let captured = Ladder::captured(dialogue, role);
    if let Some(reason) = dialogue.unplayable() {
        return SideReport {
            verdict: Verdict::Skipped,
            captured,
            replayed: Ladder::default(),
            differences: Vec::new(),
            notes: vec![reason],
        };
    }
    let Some(player) = player else {
        return SideReport {
            verdict: Verdict::NotPlayed,
            replayed: Ladder::default(),
            differences: differences(&captured, &Ladder::default()),
            captured,
            notes: vec!["this side never played: nothing of the dialogue reached it".into()],
        };
    };
    let replayed = player.ladder().clone();
    let differences = differences(&captured, &replayed);
    let mut notes = player.notes().to_vec();
    let verdict = match player.outcome() {
        Some(Outcome::TimedOut { step, waiting_for }) => {
            notes.push(format!(
                "timed out waiting for step {} ({waiting_for})",
                step + 1
            ));
            Verdict::TimedOut
        }
        None => {
            notes.push("interrupted before the dialogue ended".into());
            Verdict::TimedOut
        }
        Some(Outcome::Completed) if differences.is_empty() => Verdict::Matched,
        Some(Outcome::Completed) => Verdict::Diverged,
    };
    SideReport {
        verdict,
        captured,
        replayed,
        differences,
        notes,
    }
}

/// The local address the kernel would use toward `target`.
fn route_to(target: SocketAddr) -> Result<IpAddr, ReplayError> {
    let unspecified: SocketAddr = match target {
        SocketAddr::V4(_) => ([0, 0, 0, 0], 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let probe = std::net::UdpSocket::bind(unspecified)
        .and_then(|socket| socket.connect(target).map(|()| socket))
        .and_then(|socket| socket.local_addr())
        .map_err(|source| ReplayError::NoRoute { target, source })?;
    Ok(probe.ip())
}

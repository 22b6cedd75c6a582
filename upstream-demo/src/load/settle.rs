//! Waiting for the callback service to settle each message: rounds of
//! `Admin.GetMessage` over the ids not yet terminal, until none is left or the
//! deadline passes. A failing Admin API is retried until the deadline too (the
//! callback service may be restarting) and surfaces in the report.

use std::{collections::HashMap, time::Duration};

use futures_util::{StreamExt, stream};
use indicatif::ProgressBar;
use recheck::auth::WithToken;
use recheck_proto::v1::{GetMessageRequest, admin_client::AdminClient};
use tokio::time::{Instant, sleep};
use tonic::{Code, transport::Channel};

use super::report::{Settled, is_terminal};

/// `GetMessage` calls in flight at once.
const CONCURRENCY: usize = 64;
/// Pause between rounds: the first checks come due after the check delay anyway.
const ROUND_PAUSE: Duration = Duration::from_secs(1);
/// Longer than a `Resend` RPC takes to return once its message was confirmed.
const RESEND_LAG: Duration = Duration::from_secs(2);

pub struct Settlement {
    /// Last status seen per id; ids the callback service never knew are absent.
    pub statuses: HashMap<String, Settled>,
    /// The Admin API's error in the last round, if some messages could not be read.
    pub last_error: Option<String>,
}

pub async fn settle(
    admin: AdminClient<WithToken<Channel>>,
    ids: Vec<String>,
    wait: Duration,
    bar: ProgressBar,
) -> Settlement {
    let deadline = Instant::now() + wait;
    let mut open = ids;
    let mut settlement = Settlement { statuses: HashMap::new(), last_error: None };
    loop {
        let answers: Vec<_> = stream::iter(std::mem::take(&mut open))
            .map(|id| {
                let mut admin = admin.clone();
                async move {
                    let answer = admin.get_message(GetMessageRequest { message_id: id.clone() }).await;
                    (id, answer)
                }
            })
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;
        let mut round_error = None;
        for (id, answer) in answers {
            match answer {
                Ok(response) => {
                    if let Some(m) = response.into_inner().message {
                        let settled = Settled { status: m.status(), resend_count: m.resend_count };
                        settlement.statuses.insert(id.clone(), settled);
                        if is_terminal(settled.status) {
                            bar.inc(1);
                            continue;
                        }
                    }
                }
                // Not seen yet: its CHECK is still in a delay queue and no confirm came.
                Err(status) if status.code() == Code::NotFound => {}
                Err(status) => round_error = Some(format!("{}: {}", status.code(), status.message())),
            }
            open.push(id);
        }
        if let Some(e) = round_error.as_ref().filter(|e| settlement.last_error.as_ref() != Some(e)) {
            bar.suspend(|| eprintln!("warning: Admin API failing, retrying until the deadline: {e}"));
        }
        settlement.last_error = round_error;
        let now = Instant::now();
        if open.is_empty() || now >= deadline {
            break;
        }
        sleep(ROUND_PAUSE.min(deadline - now)).await;
    }
    bar.finish();
    // A resend's own confirm can settle a message while the callback service is still
    // recording that resend (the RPC returns after the confirm landed): read the
    // unresent ones once more so the report counts such resends.
    sleep(RESEND_LAG.min(deadline.saturating_duration_since(Instant::now()))).await;
    let unresent: Vec<String> = settlement
        .statuses
        .iter()
        .filter(|(_, s)| is_terminal(s.status) && s.resend_count == 0)
        .map(|(id, _)| id.clone())
        .collect();
    let refreshed: Vec<_> = stream::iter(unresent)
        .map(|id| {
            let mut admin = admin.clone();
            async move { (admin.get_message(GetMessageRequest { message_id: id.clone() }).await, id) }
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    for (answer, id) in refreshed {
        if let Some(m) = answer.ok().and_then(|r| r.into_inner().message) {
            settlement.statuses.insert(id, Settled { status: m.status(), resend_count: m.resend_count });
        }
    }
    settlement
}

//! `type = "log"`: writes the subject to the journal (warning level for firing and
//! reminders). Always available; useful as a second channel and in the demo.

use super::{BuildContext, KindConfig, Message, Outcome, Sender};
use crate::alerts::EventKind;
use crate::settings::Problems;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// `type = "log"` has no keys of its own.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct LogNotifierConfig {}

impl KindConfig for LogNotifierConfig {
    type Sender = Log;

    /// The journal: no server, no certificate.
    fn tls_endpoints(&self, _label: &str) -> Vec<crate::tls::Endpoint> {
        Vec::new()
    }

    fn attempt_timeout(&self) -> Duration {
        Duration::from_secs(1)
    }

    fn build(&self, _context: &BuildContext<'_>) -> anyhow::Result<Log> {
        Ok(Log)
    }

    fn validate(&self, _path: &str, _problems: &mut Problems) {}
}

/// A ready log notifier.
pub struct Log;

impl Sender for Log {
    async fn deliver(&self, message: &Message<'_>) -> Outcome {
        let (name, uid, subject) = (message.notifier, &message.event.uid, &message.subject);
        match message.event.kind {
            EventKind::Firing | EventKind::Reminder | EventKind::Escalated => {
                tracing::warn!(notifier = %name, event = %uid, "{subject}")
            }
            _ => tracing::info!(notifier = %name, event = %uid, "{subject}"),
        }
        Outcome::Delivered
    }
}

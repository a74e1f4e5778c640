//! Old entry points, kept only so that callers outside this branch (`cli.rs`,
//! `tests/alerts.rs`) compile until the merge. Delete this file once they call
//! [`super::send_test_event`] with the pieces of the configuration it needs.

use super::{send_test_event, Outcome};

/// Sends one test event through the notifier `name` (for `outpost notify-test`),
/// without the outbox.
pub async fn send_test(config: &crate::config::Config, name: &str) -> anyhow::Result<Outcome> {
    let clock = crate::clock::Clock::system();
    send_test_event(
        &config.notifiers,
        &config.agent.site,
        &config.agent.gateway_id,
        name,
        &clock,
    )
    .await
}

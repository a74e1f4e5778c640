//! `outpost run`: the agent, as the systemd service runs it. SIGTERM and SIGINT shut
//! it down (the token), SIGHUP reloads the configuration.

use super::Runtime;
use std::future::Future;
use std::path::Path;
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

pub fn main(path: &Path) -> ExitCode {
    let config = match super::load_config_or_exit(path, |n| {
        format!("outpost: the configuration has {n} problem(s); not starting.")
    }) {
        Ok(c) => c,
        Err(code) => return code,
    };
    super::init_tracing(&config.log.level);
    let path = path.to_path_buf();
    until_signal(|token| {
        let (reload_tx, reload_rx) = tokio::sync::mpsc::channel(1);
        spawn_reload_handler(reload_tx);
        crate::run::pipeline::run(path, config, token, reload_rx)
    })
}

/// Runs `f` on the agent's runtime with a shutdown token cancelled by SIGTERM or
/// SIGINT (`run` and `demo`).
pub fn until_signal<F, Fut>(f: F) -> ExitCode
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let outcome = super::block_on(Runtime::Agent, async {
        let token = CancellationToken::new();
        spawn_signal_handler(token.clone());
        f(token).await
    });
    match outcome {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            tracing::error!(error = format!("{e:#}"), "Outpost stopped with an error.");
            eprintln!("outpost: {e:#}");
            ExitCode::FAILURE
        }
        Err(code) => code,
    }
}

/// SIGHUP (`systemctl reload outpost`) asks for a configuration reload. Requests that
/// arrive while one is pending are merged.
fn spawn_reload_handler(reload: tokio::sync::mpsc::Sender<()>) {
    use tokio::signal::unix::{signal, SignalKind};
    tokio::spawn(async move {
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            tracing::error!("Cannot install the SIGHUP handler; reload is unavailable.");
            return;
        };
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP received; reloading the configuration.");
            let _ = reload.try_send(());
        }
    });
}

fn spawn_signal_handler(token: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    tokio::spawn(async move {
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            tracing::error!("Cannot install signal handlers.");
            return;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received; shutting down."),
            _ = int.recv() => tracing::info!("SIGINT received; shutting down."),
        }
        token.cancel();
    });
}

//! `berth serve`: the configuration's last layer (flags), logging, and the server until a
//! signal.

use anyhow::{Context, Result};
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub(crate) struct ServeArgs {
    /// Listen address, host:port [default: 127.0.0.1:7700; $BERTH_LISTEN]
    #[arg(long)]
    listen: Option<String>,
    /// Data directory: store, admin key, box disks [default: $BERTH_DATA_DIR, else
    /// ~/.local/share/berth]
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// TOML config file.
    #[arg(long, env = "BERTH_CONFIG")]
    config: Option<PathBuf>,
    /// Model API URL the gateway forwards to [default: https://api.anthropic.com;
    /// $BERTH_UPSTREAM_URL]
    #[arg(long)]
    upstream_url: Option<String>,
    /// Log format [default: text; $BERTH_LOG_FORMAT]
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(
        berth_server::config::LogFormat::ALLOWED.iter().copied(),
    ))]
    log_format: Option<String>,
    /// Also run the built-in mock model on loopback and use it as the upstream: agents work
    /// offline, no API key needed.
    #[arg(long)]
    mock_model: bool,
}

pub(crate) async fn serve(a: ServeArgs) -> Result<()> {
    let mut cfg = berth_server::Config::load(a.config.as_deref())?;
    if let Some(l) = a.listen {
        cfg.listen = l.parse().with_context(|| format!("--listen {l}"))?;
    }
    if let Some(d) = a.data_dir {
        cfg.data_dir = d;
    }
    if let Some(u) = a.upstream_url {
        cfg.upstream_url = u;
    }
    if let Some(f) = a.log_format {
        cfg.log_format = f.parse().map_err(anyhow::Error::msg)?;
    }
    init_logging(cfg.log_format.as_str());
    if a.mock_model {
        let mock = berth_mock_model::Mock::new(
            berth_mock_model::scenario::Scenario::demo(),
            std::time::Duration::from_millis(20),
        );
        cfg.upstream_url = berth_mock_model::spawn_loopback(&mock).await?;
        if cfg.anthropic_api_key.is_none() {
            cfg.anthropic_api_key = Some("sk-berth-mock-model".into());
        }
        tracing::info!(upstream = %cfg.upstream_url, "using the built-in mock model");
    }
    let helper = berth_sandbox::native::helper_beside(
        &std::env::current_exe().context("locating the berth executable")?,
    );
    let shutdown = async {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return std::future::pending().await,
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    berth_server::run(
        cfg,
        berth_server::Runtime::new(helper),
        |s| {
            println!(
                "berth listening on http://{} (admin key in {})",
                s.addr,
                s.admin_key_file.display()
            );
        },
        shutdown,
    )
    .await?;
    Ok(())
}

pub(crate) fn init_logging(format: &str) {
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_from_env("BERTH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = if format == "json" {
        fmt.json().boxed()
    } else {
        fmt.boxed()
    };
    // Each layer has its own filter: exported spans do not depend on the log level.
    let registry = tracing_subscriber::registry().with(fmt.with_filter(filter));
    #[cfg(feature = "otel")]
    let registry = registry.with(otel::layer());
    registry.init();
}

/// OpenTelemetry export of tracing spans over OTLP/HTTP, when built with `--features otel`
/// and `OTEL_EXPORTER_OTLP_ENDPOINT` is set (the standard OTLP environment variables apply).
#[cfg(feature = "otel")]
mod otel {
    use opentelemetry::trace::TracerProvider;
    use tracing_subscriber::registry::LookupSpan;
    use tracing_subscriber::Layer;

    pub fn layer<S>() -> Option<impl tracing_subscriber::Layer<S>>
    where
        S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    {
        std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT")?;
        let exporter = match opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .build()
        {
            Ok(e) => e,
            Err(e) => {
                eprintln!("OpenTelemetry export disabled: {e}");
                return None;
            }
        };
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(
                opentelemetry_sdk::Resource::builder()
                    .with_service_name("berth")
                    .build(),
            )
            .build();
        let tracer = provider.tracer("berth");
        opentelemetry::global::set_tracer_provider(provider);
        let filter = tracing_subscriber::EnvFilter::try_from_env("BERTH_OTEL_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
        Some(
            tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_filter(filter),
        )
    }
}

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

use secretfs::class::{ApiSource, ClassSource, DirSource};
use secretfs::csi::{IdentityService, NodeService};
use secretfs::provider::ProviderClient;
use secretfs::provider::example::{self, ExampleProvider};
use secretfs::secret_mem::{MemoryKind, MemoryPolicy, Region};
use secretfs::volume::Manager;

/// Every heap block is wiped before it is freed (see `secret_mem::alloc`).
#[global_allocator]
static ALLOC: secretfs::secret_mem::alloc::ZeroizingAlloc =
    secretfs::secret_mem::alloc::ZeroizingAlloc;

#[derive(Parser)]
#[command(
    name = "secretfs",
    version,
    about = "CSI node driver serving secrets from locked memory through FUSE"
)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Same as --log-format json (the upstream driver's flag).
    #[arg(long, global = true)]
    log_format_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the CSI node plugin.
    Serve(Box<ServeArgs>),
    /// Run the driver and an example provider in-process, publish a volume as kubelet
    /// would, show it, and clean up (needs root and /dev/fuse).
    Demo,
    /// Check whether this host can run the driver safely; exits non-zero if not.
    Doctor {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Ask a running driver what it holds: volumes, files, memory kind, page-cache pages,
    /// reader binding, open handles, process posture.
    Audit {
        /// The driver's admin socket (serve --admin-socket).
        #[arg(long, default_value = "unix:///var/lib/secretfs/admin.sock")]
        endpoint: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Hold every volume's fds for the driver so that its volumes survive a crash of the
    /// driver process (run it as a second container of the driver's pod).
    Keeper {
        /// The driver's --state-dir; the keeper listens on keeper.sock in it.
        #[arg(long, default_value = "/var/lib/secretfs")]
        state_dir: PathBuf,
    },
    /// Run the example provider plugin, serving the secrets described in a YAML file.
    ExampleProvider {
        /// Unix socket to listen on, normally <provider dir>/<name>.sock.
        #[arg(long)]
        socket: PathBuf,
        /// YAML file with the secrets to serve (re-read on every Mount call).
        #[arg(long)]
        secrets: PathBuf,
        /// Add request.json (what the driver sent) to every response; for tests.
        #[arg(long)]
        echo_request: bool,
    },
}

#[derive(clap::Args)]
pub struct ServeArgs {
    /// CSI endpoint: unix:///path/to/csi.sock.
    #[arg(long, default_value = "unix:///run/secretfs/csi.sock")]
    endpoint: String,
    /// This node's name, reported by NodeGetInfo.
    #[arg(long, alias = "nodeid")]
    node_id: String,
    /// Driver name reported by GetPluginInfo (pods name it in `csi.driver`).
    #[arg(long, alias = "drivername", default_value = "secretfs.csi.io")]
    driver_name: String,
    /// Directory holding provider plugin sockets (<dir>/<provider>.sock); repeatable.
    #[arg(
        long = "provider-dir",
        alias = "provider-volume",
        default_value = "/var/run/secrets-store-csi-providers"
    )]
    provider_dirs: Vec<PathBuf>,
    /// More provider socket directories, searched after --provider-dir (comma-separated or
    /// repeated).
    #[arg(
        long = "additional-provider-volume-paths",
        value_delimiter = ',',
        default_value = "/etc/kubernetes/secrets-store-csi-providers"
    )]
    additional_provider_dirs: Vec<PathBuf>,
    /// Standalone mode: read SecretProviderClass objects from *.yaml/*.yml files here. Without
    /// it, classes come from the Kubernetes API.
    #[arg(long)]
    class_dir: Option<PathBuf>,
    /// Kubernetes API credentials; default: KUBECONFIG, ~/.kube/config, then the in-cluster
    /// service account.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Write a SecretProviderClassPodStatus per mounted pod volume (default: on without
    /// --class-dir, off with it).
    #[arg(long, action = clap::ArgAction::Set)]
    write_pod_status: Option<bool>,
    /// Directory for non-secret driver state.
    #[arg(long, default_value = "/var/lib/secretfs")]
    state_dir: PathBuf,
    /// Admin socket that `secretfs audit` talks to (root only); default <state-dir>/admin.sock.
    #[arg(long)]
    admin_socket: Option<PathBuf>,
    /// How often volumes are refreshed from their provider (e.g. 30s, 2m; 0 = off). Also the
    /// least age of the last fetch before a kubelet republish re-fetches.
    #[arg(long, alias = "rotation-poll-interval", default_value = "2m", value_parser = parse_interval)]
    rotation_interval: Duration,
    /// Refresh volumes in the background every --rotation-interval. With false, volumes are
    /// refreshed only when kubelet republishes them (CSIDriver requiresRepublish).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    enable_secret_rotation: bool,
    /// Where secrets live: memfd_secret where the kernel allows it, else mlocked memory
    /// (auto); memfd_secret or refuse to publish (memfd-secret); always mlocked memory (mlock).
    #[arg(long, value_enum, default_value_t = MemoryArg::Auto)]
    memory: MemoryArg,
    /// Same as --memory memfd-secret.
    #[arg(long, conflicts_with = "memory")]
    require_secret_memory: bool,
    /// Only processes in the volume's pod (by cgroup; needs hostPID) may open its files, even as
    /// root. Volumes without csi.storage.k8s.io/pod.uid are not bound.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    bind_readers_to_pod: bool,
    /// Prometheus /metrics, /healthz and /readyz listen here (`ADDR:PORT` or `:PORT`); empty:
    /// off.
    #[arg(long, default_value = "0.0.0.0:8095")]
    metrics_addr: String,
    /// Most provider calls the background refresh makes at once.
    #[arg(long, default_value_t = 4)]
    rotation_concurrency: usize,
    /// Largest total size of one volume's files, in bytes.
    #[arg(long, default_value_t = 4 * 1024 * 1024)]
    max_volume_bytes: usize,
    /// Deadline for one provider Mount call (e.g. 30s).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    provider_timeout: Duration,
}

#[derive(Clone, Copy, ValueEnum)]
enum MemoryArg {
    Auto,
    MemfdSecret,
    Mlock,
}

fn parse_interval(s: &str) -> Result<Duration, String> {
    if s.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(s).map_err(|e| e.to_string())
}

fn init_logging(format: LogFormat, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
}

async fn serve(args: ServeArgs) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let socket = secretfs::grpc_uds::socket_path(&args.endpoint)?;
    secretfs::secret_mem::set_policy(match (args.memory, args.require_secret_memory) {
        (_, true) | (MemoryArg::MemfdSecret, _) => MemoryPolicy::RequireSecretMem,
        (MemoryArg::Mlock, _) => MemoryPolicy::Locked,
        (MemoryArg::Auto, _) => MemoryPolicy::Auto,
    });
    std::fs::create_dir_all(&args.state_dir)
        .map_err(|e| format!("--state-dir {}: {e}", args.state_dir.display()))?;
    let write_pod_status = args.write_pod_status.unwrap_or(args.class_dir.is_none());
    let kube = if args.class_dir.is_none() || write_pod_status {
        Some(secretfs::class::client(args.kubeconfig.as_deref()).await?)
    } else {
        None
    };
    let classes: Arc<dyn ClassSource> = match (&args.class_dir, &kube) {
        (Some(dir), _) => Arc::new(DirSource::new(dir)),
        (None, Some(client)) => Arc::new(ApiSource::start(client.clone())),
        (None, None) => return Err("no class source".into()),
    };
    let mut provider_dirs = args.provider_dirs.clone();
    provider_dirs.extend(args.additional_provider_dirs.iter().cloned());
    let provider = ProviderClient {
        dirs: provider_dirs.clone(),
        timeout: args.provider_timeout,
        max_volume_bytes: args.max_volume_bytes,
    };
    tracing::info!(
        driver = %args.driver_name,
        node = %args.node_id,
        providers = ?provider_dirs,
        classes = if args.class_dir.is_some() { "directory" } else { "Kubernetes API" },
        write_pod_status,
        rotation_interval = ?args.rotation_interval,
        memory = Region::preferred_kind().map_or("unavailable: publishes will fail", MemoryKind::as_str),
        "starting secretfs"
    );
    let manager = Arc::new(Manager::new(
        classes,
        provider,
        args.rotation_interval,
        args.bind_readers_to_pod,
    ));
    if let Some(client) = kube.filter(|_| write_pod_status) {
        manager.set_status_sink(Arc::new(secretfs::podstatus::Writer::start(
            client,
            &args.node_id,
        )));
    }
    // Volumes of an earlier driver process (a running predecessor, or the keeper) are taken
    // over before this process binds its sockets.
    secretfs::handoff::start(&manager, &args.state_dir).await;
    let admin_socket = args
        .admin_socket
        .clone()
        .unwrap_or_else(|| args.state_dir.join("admin.sock"));
    let admin = tokio::spawn({
        let manager = Arc::clone(&manager);
        async move {
            if let Err(e) = secretfs::admin::serve(&admin_socket, manager).await {
                tracing::error!(error = %e, "admin socket failed; `secretfs audit` will not work");
            }
        }
    });
    let rotation = if args.enable_secret_rotation {
        secretfs::rotation::spawn(
            Arc::clone(&manager),
            args.rotation_interval,
            args.rotation_concurrency,
        )
    } else {
        None
    };
    let identity = IdentityService::new(&args.driver_name);
    let metrics = if args.metrics_addr.is_empty() {
        None
    } else {
        // `:8095` (the upstream driver's spelling) listens on every address.
        let spelled = match args.metrics_addr.strip_prefix(':') {
            Some(port) => format!("0.0.0.0:{port}"),
            None => args.metrics_addr.clone(),
        };
        let addr: std::net::SocketAddr = spelled
            .parse()
            .map_err(|e| format!("--metrics-addr {:?}: {e}", args.metrics_addr))?;
        let ready = identity.ready_flag();
        Some(tokio::spawn(async move {
            if let Err(e) = secretfs::metrics::serve(addr, ready).await {
                tracing::error!(error = %e, %addr, "metrics listener failed; no /metrics, /healthz or /readyz");
            }
        }))
    };
    secretfs::csi::serve(
        &socket,
        identity,
        NodeService::new(&args.node_id, Arc::clone(&manager)),
        shutdown_signal(),
    )
    .await?;
    if let Some(task) = rotation {
        task.abort();
    }
    admin.abort();
    if let Some(task) = metrics {
        task.abort();
    }
    // Published volumes stay mounted for the next driver process to take over.
    manager.leave_all_mounted();
    let _ = std::fs::remove_file(&socket);
    Ok(())
}

fn main() -> ExitCode {
    if let Err(e) = secretfs::hardening::harden_process() {
        eprintln!("secretfs: cannot harden the process: {e}");
        return ExitCode::FAILURE;
    }
    let cli = Cli::parse();
    // The demo prints its own story; logs only for problems unless RUST_LOG asks for more.
    let level = if matches!(cli.command, Command::Demo) {
        "warn"
    } else {
        "info"
    };
    let format = if cli.log_format_json {
        LogFormat::Json
    } else {
        cli.log_format
    };
    init_logging(format, level);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("secretfs: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => serve(*args).await,
            Command::Demo => secretfs::demo::run().await,
            Command::Doctor { json } => {
                let checks = tokio::task::spawn_blocking(secretfs::admin::doctor::run)
                    .await
                    .map_err(|e| e.to_string())?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&checks)?);
                } else {
                    print!("{}", secretfs::admin::doctor::render(&checks));
                }
                if secretfs::admin::doctor::healthy(&checks) {
                    Ok(())
                } else {
                    Err("unsafe host".into())
                }
            }
            Command::Audit { endpoint, json } => {
                let socket = secretfs::grpc_uds::socket_path(&endpoint)?;
                let report = secretfs::admin::fetch(&socket).await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&report)?);
                } else {
                    print!("{}", secretfs::admin::report::render(&report));
                }
                Ok(())
            }
            Command::Keeper { state_dir } => {
                tokio::task::spawn_blocking(move || secretfs::handoff::keeper::run(&state_dir))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| format!("keeper: {e}").into())
            }
            Command::ExampleProvider {
                socket,
                secrets,
                echo_request,
            } => {
                example::serve(
                    &socket,
                    ExampleProvider::new(secrets, echo_request),
                    shutdown_signal(),
                )
                .await
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("secretfs: {e}");
            ExitCode::FAILURE
        }
    }
}

//! The `gannet` command.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use gannet::admin::client::{self, CallError};
use gannet::admin::protocol::{Action, Selector};
use gannet::config::Config;
use gannet::queue::QueueIndex;
use gannet::spool::recovery::{list_segments, read_message, read_segment, scan_segment, Damage};
use gannet::spool::MessageId;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Gannet: a shard-per-core mail transfer agent.
///
/// With no subcommand, serves SMTP with the configuration in --config, or with the embedded
/// default (mx on 127.0.0.1:2525, submission on 127.0.0.1:2587, spool in ./gannet-spool).
/// SIGTERM or SIGINT stops it gracefully; a second signal stops it at once.
#[derive(Parser)]
#[command(name = "gannet", version)]
struct Cli {
    /// Configuration file (TOML). Without it, the embedded default is used.
    #[arg(long, short = 'c', value_name = "FILE", global = true)]
    config: Option<PathBuf>,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a configuration file and print the effective configuration (defaults filled in).
    CheckConfig {
        /// The file to check.
        file: PathBuf,
    },
    /// Inspect the spool.
    Queue {
        #[command(subcommand)]
        command: QueueCommand,
    },
    /// The suppression list (recipients not to mail), through the running server's API.
    Suppress {
        #[command(subcommand)]
        command: SuppressCommand,
    },
    /// Print the embedded default configuration.
    DefaultConfig,
    /// Ask the running server (the one holding this configuration's spool) to reload: SIGHUP.
    Reload,
    /// DKIM keys.
    Dkim {
        #[command(subcommand)]
        command: DkimCommand,
    },
    /// Hash a password (argon2id) and print a password-file line for USER. The password is read
    /// from the terminal without echo, or as the first line of standard input.
    Passwd {
        /// The user name clients give to AUTH (an address such as alice@example.com lets the
        /// user send as that address).
        user: String,
        /// More envelope senders the user may use, comma-separated (`@example.com` for a whole
        /// domain).
        #[arg(long, value_name = "LIST")]
        addresses: Option<String>,
    },
}

#[derive(Subcommand)]
enum DkimCommand {
    /// Make a signing key (PEM, mode 0600) and print the DNS TXT record to publish.
    Keygen {
        /// The signing domain (d=).
        #[arg(long)]
        domain: String,
        /// The selector (s=): the record goes at <selector>._domainkey.<domain>.
        #[arg(long)]
        selector: String,
        #[arg(long, value_enum, default_value = "rsa")]
        algorithm: KeyAlgorithm,
        /// Where to write the key (default: <selector>.<domain>.key here). Never overwritten.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum SuppressCommand {
    /// List entries, newest first; every option given must match.
    List {
        /// One address.
        #[arg(long)]
        address: Option<String>,
        /// `global`, or a sender domain.
        #[arg(long)]
        scope: Option<String>,
        /// hard-bounce, complaint, operator or import.
        #[arg(long)]
        source: Option<String>,
        /// Text in the address or the reason.
        #[arg(long)]
        contains: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Whether mail (from SENDER, if given) to ADDRESS is suppressed, and why.
    Check {
        address: String,
        #[arg(long)]
        sender: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Suppress ADDRESS (source: operator).
    Add {
        address: String,
        /// `global` (the default), or a sender domain: only mail from that domain is stopped.
        #[arg(long)]
        scope: Option<String>,
        #[arg(long)]
        reason: Option<String>,
        /// Seconds until the entry lapses (default: never).
        #[arg(long = "expires-after", value_name = "SECONDS")]
        expires_after_s: Option<u64>,
        #[arg(long)]
        json: bool,
    },
    /// Remove ADDRESS's entries (of one scope, or of every scope).
    Remove {
        address: String,
        #[arg(long)]
        scope: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Import a CSV file (header: address,scope,source,reason,added_unix_s,expires_unix_s;
    /// only address is required).
    Import {
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Write every live entry as CSV to FILE (default: standard output).
    Export {
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum KeyAlgorithm {
    /// RSA, 2048 bits (rsa-sha256): what every receiver verifies.
    Rsa,
    /// Ed25519 (ed25519-sha256, RFC 8463): small and fast; sign with RSA too for receivers
    /// that do not verify it yet.
    Ed25519,
}

#[derive(Subcommand)]
enum QueueCommand {
    /// List queued messages: from the running server's admin API, or from the spool files when
    /// the server does not answer (then without filters).
    List {
        #[command(flatten)]
        filter: Filter,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Read the spool files even if the server answers.
        #[arg(long)]
        spool: bool,
    },
    /// Print one message exactly as spooled (our Received header, then the client's bytes), read
    /// from the spool files; --json asks the server for its state, recipients and headers.
    Show {
        /// The id from `queue list` or the `250 ... queued as` reply.
        id: String,
        /// Print the envelope instead of the message.
        #[arg(long)]
        envelope: bool,
        /// Print the server's JSON view of the message.
        #[arg(long)]
        json: bool,
    },
    /// The queue's shape: pending recipients by destination domain and age (from the server).
    Summary {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Retry deferred mail now, whatever its schedule: what the filter selects, or everything.
    Flush {
        #[command(flatten)]
        filter: Filter,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Hold what the filter selects: never attempted until released (survives restarts).
    Hold {
        #[command(flatten)]
        filter: Filter,
        #[arg(long)]
        json: bool,
    },
    /// Release held mail: attempted at once.
    Release {
        #[command(flatten)]
        filter: Filter,
        #[arg(long)]
        json: bool,
    },
    /// Delete what the filter selects, without telling the sender.
    Delete {
        #[command(flatten)]
        filter: Filter,
        #[arg(long)]
        json: bool,
    },
    /// Stop delivery to a recipient domain (for all shards, surviving restarts) until resumed or
    /// until the time is up; its mail waits without adding to its backoff.
    Suspend {
        /// The recipient domain.
        domain: String,
        /// Why (logged, and listed by `queue suspended`).
        #[arg(long)]
        reason: String,
        /// How long, in seconds (at most 30 days).
        #[arg(long = "for", value_name = "SECONDS", default_value_t = 3600)]
        duration_s: u64,
        #[arg(long)]
        json: bool,
    },
    /// End a suspension: the domain's waiting mail goes at once.
    Resume {
        domain: String,
        #[arg(long)]
        json: bool,
    },
    /// The suspended destinations, and those down (connection failures in a row).
    Suspended {
        #[arg(long)]
        json: bool,
    },
    /// Return what the filter selects to its senders with a failure notice (RFC 3464) giving
    /// REASON, then delete it.
    Bounce {
        #[command(flatten)]
        filter: Filter,
        /// Why, for the sender's notice.
        #[arg(long)]
        reason: String,
        #[arg(long)]
        json: bool,
    },
}

/// Which messages a queue command applies to; every option given must match.
#[derive(clap::Args, Default)]
struct Filter {
    /// One message id.
    #[arg(long)]
    id: Option<String>,
    /// The envelope sender (`<>` for bounces).
    #[arg(long)]
    sender: Option<String>,
    /// A pending recipient.
    #[arg(long)]
    recipient: Option<String>,
    /// A pending recipient's domain.
    #[arg(long)]
    domain: Option<String>,
    /// ready, deferred, held or delivering.
    #[arg(long)]
    state: Option<String>,
    /// Received at least this many seconds ago.
    #[arg(long, value_name = "SECONDS")]
    min_age: Option<u64>,
}

impl Filter {
    fn selector(self) -> Selector {
        Selector {
            id: self.id,
            sender: self.sender,
            recipient: self.recipient,
            domain: self.domain,
            state: self.state,
            min_age_s: self.min_age,
        }
    }
}

fn load(path: Option<&Path>) -> Result<(Config, String), String> {
    match path {
        None => Ok((
            Config::embedded_default(),
            gannet::config::EMBEDDED_DEFAULT_NAME.to_string(),
        )),
        Some(path) => {
            let name = path.display().to_string();
            let text = std::fs::read_to_string(path).map_err(|e| format!("{name}: cannot read: {e}"))?;
            let config = Config::parse(&text, &name).map_err(|e| e.to_string())?;
            Ok((config, name))
        }
    }
}

fn queue_list(config: &Config) -> Result<(), String> {
    let spool = &config.spool.directory;
    let mut shard_dirs: Vec<(u16, PathBuf)> = Vec::new();
    let entries = match std::fs::read_dir(spool) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            println!("0 message(s) in {}", spool.display());
            return Ok(());
        }
        Err(e) => return Err(format!("cannot read spool directory {}: {e}", spool.display())),
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if let Some(n) = name.strip_prefix("shard-").and_then(|n| n.parse::<u16>().ok()) {
            shard_dirs.push((n, entry.path()));
        }
    }
    shard_dirs.sort();
    let mut buf = Vec::new();
    let (mut messages, mut outcomes, mut tombstones, mut deferrals) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (shard, dir) in shard_dirs {
        let segments = list_segments(&dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
        for (seq, path) in segments {
            read_segment(&path, &mut buf).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            let scan = scan_segment(&buf, shard, seq);
            for damage in &scan.damage {
                if let Damage::Corrupt { offset, reason, .. } = damage {
                    eprintln!("{}: damaged record at offset {offset}: {reason}", path.display());
                }
            }
            messages.extend(scan.messages);
            outcomes.extend(scan.outcomes);
            tombstones.extend(scan.tombstones);
            deferrals.extend(scan.deferrals);
        }
    }
    let index = QueueIndex::rebuild(messages, &outcomes, &tombstones, &deferrals);
    for message in index.sorted() {
        println!("{}", message.listing_line());
    }
    println!("{} message(s) in {}", index.len(), spool.display());
    Ok(())
}

fn queue_show(config: &Config, id: &str, envelope_only: bool) -> Result<(), String> {
    let parsed: MessageId = id
        .parse()
        .map_err(|()| format!("`{id}` is not a message id; ids look like 01A2278EF947-00-000000"))?;
    let (envelope, content) = read_message(&config.spool.directory, parsed).map_err(|e| e.to_string())?;
    if envelope_only {
        println!("sender: <{}>", String::from_utf8_lossy(&envelope.sender));
        for r in &envelope.recipients {
            println!("recipient: <{}>", String::from_utf8_lossy(&r.address));
        }
        println!("client: {}", envelope.client_ip);
        println!("helo: {}", String::from_utf8_lossy(&envelope.helo));
        println!("smtputf8: {}", envelope.smtputf8);
        println!("body: {:?}", envelope.body);
        return Ok(());
    }
    std::io::stdout().write_all(&content).map_err(|e| e.to_string())
}

fn run(cli: Cli) -> Result<(), String> {
    match cli.command {
        Some(Command::CheckConfig { file }) => {
            let (config, _) = load(Some(&file))?;
            gannet::dkim::Signers::load(&config.dkim).map_err(|e| format!("{}: {e}", file.display()))?;
            if let Some(seal) = &config.mail_authentication.arc_seal {
                gannet::dkim::seal::Sealer::load(seal).map_err(|e| format!("{}: {e}", file.display()))?;
            }
            print!("{}", config.to_toml());
            eprintln!("{}: ok", file.display());
            Ok(())
        }
        Some(Command::DefaultConfig) => {
            print!("{}", gannet::config::DEFAULT_TOML);
            Ok(())
        }
        Some(Command::Passwd { user, addresses }) => passwd(&user, addresses.as_deref()),
        Some(Command::Reload) => {
            let (config, _) = load(cli.config.as_deref())?;
            reload(&config)
        }
        Some(Command::Dkim {
            command:
                DkimCommand::Keygen {
                    domain,
                    selector,
                    algorithm,
                    out,
                },
        }) => {
            let algorithm = match algorithm {
                KeyAlgorithm::Rsa => gannet::config::dkim::DkimAlgorithm::RsaSha256,
                KeyAlgorithm::Ed25519 => gannet::config::dkim::DkimAlgorithm::Ed25519Sha256,
            };
            print!(
                "{}",
                gannet::dkim::keygen::run(&domain, &selector, algorithm, out.as_deref())?
            );
            Ok(())
        }
        Some(Command::Queue { command }) => {
            let (config, _) = load(cli.config.as_deref())?;
            queue(&config, command)
        }
        Some(Command::Suppress { command }) => {
            let (config, _) = load(cli.config.as_deref())?;
            suppress(&config, command)
        }
        None => {
            let (config, name) = load(cli.config.as_deref())?;
            gannet::logging::init(&config.log);
            let served = gannet::server::serve(config, &name);
            gannet::logging::finish();
            served
        }
    }
}

/// `gannet reload`: SIGHUP to the process that holds the spool's lock (what the systemd unit's
/// ExecReload runs). What was reloaded, and what was kept, is in that process's log.
fn reload(config: &Config) -> Result<(), String> {
    let pid = signal_server(config, libc::SIGHUP, "reload")?;
    println!("asked gannet (pid {pid}) to reload; its log says what changed");
    Ok(())
}

/// Sends `signal` to the gannet process holding `config`'s spool lock; returns its pid. `what`
/// names what the caller wanted, for the error when no process runs there.
fn signal_server(config: &Config, signal: i32, what: &str) -> Result<i32, String> {
    let spool = &config.spool.directory;
    let Some(pid) = gannet::server::lock::running_pid(spool)? else {
        return Err(format!(
            "no gannet process runs on spool {}; nothing to {what}",
            spool.display()
        ));
    };
    // SAFETY: kill(2) with a pid read from the spool lock its holder wrote; no memory involved.
    if unsafe { libc::kill(pid, signal) } != 0 {
        return Err(format!(
            "cannot signal gannet (pid {pid}): {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(pid)
}

/// `gannet queue ...`: through the admin API, falling back to the spool files (list, show) or
/// to SIGUSR1 (a flush of everything) when the server's API does not answer.
fn queue(config: &Config, command: QueueCommand) -> Result<(), String> {
    let client = client::Client::new(config);
    let answer = match command {
        QueueCommand::List { filter, json, spool } => {
            let selector = filter.selector();
            let page = config.admin.page_size_max;
            match client.and_then(|c| {
                if spool {
                    Err(CallError::Unreachable("--spool".into()))
                } else {
                    client::list(&c, &selector, page, json)
                }
            }) {
                Ok(text) => text,
                Err(CallError::Unreachable(why)) => {
                    if !selector.is_all() || json {
                        return Err(format!("{why}; filters and --json need the running server (without them, the spool files are listed)"));
                    }
                    return queue_list(config);
                }
                Err(e) => return Err(e.to_string()),
            }
        }
        QueueCommand::Show {
            id,
            envelope,
            json: false,
        } => return queue_show(config, &id, envelope),
        QueueCommand::Show { id, json: true, .. } => client
            .and_then(|c| client::show(&c, &id, true))
            .map_err(|e| e.to_string())?,
        QueueCommand::Summary { json } => client
            .and_then(|c| client::summary(&c, json))
            .map_err(|e| e.to_string())?,
        QueueCommand::Flush { filter, json } => {
            let selector = filter.selector();
            match client.and_then(|c| client::act(&c, Action::Flush, &selector, None, json)) {
                Ok(text) => text,
                Err(CallError::Unreachable(_)) if selector.is_all() && !json => return queue_flush(config),
                Err(e) => return Err(e.to_string()),
            }
        }
        QueueCommand::Hold { filter, json } => act(client, Action::Hold, filter, None, json)?,
        QueueCommand::Release { filter, json } => act(client, Action::Release, filter, None, json)?,
        QueueCommand::Delete { filter, json } => act(client, Action::Delete, filter, None, json)?,
        QueueCommand::Bounce { filter, reason, json } => act(client, Action::Bounce, filter, Some(&reason), json)?,
        QueueCommand::Suspend {
            domain,
            reason,
            duration_s,
            json,
        } => client
            .and_then(|c| client::suspend(&c, &domain, &reason, duration_s, json))
            .map_err(|e| e.to_string())?,
        QueueCommand::Resume { domain, json } => client
            .and_then(|c| client::resume(&c, &domain, json))
            .map_err(|e| e.to_string())?,
        QueueCommand::Suspended { json } => client
            .and_then(|c| client::suspended(&c, json))
            .map_err(|e| e.to_string())?,
    };
    print!("{answer}");
    Ok(())
}

/// `gannet suppress ...`: through the admin API (the list lives in the running server).
fn suppress(config: &Config, command: SuppressCommand) -> Result<(), String> {
    use gannet::admin::suppression_client as sc;
    let client = client::Client::new(config).map_err(|e| e.to_string())?;
    let answer = match command {
        SuppressCommand::List {
            address,
            scope,
            source,
            contains,
            json,
        } => {
            let mut q = form_urlencoded::Serializer::new(String::new());
            for (key, value) in [
                ("address", address),
                ("scope", scope),
                ("source", source),
                ("contains", contains),
            ] {
                if let Some(v) = value {
                    q.append_pair(key, &v);
                }
            }
            sc::list(&client, &q.finish(), json).map_err(|e| e.to_string())?
        }
        SuppressCommand::Check { address, sender, json } => {
            sc::check(&client, &address, sender.as_deref(), json).map_err(|e| e.to_string())?
        }
        SuppressCommand::Add {
            address,
            scope,
            reason,
            expires_after_s,
            json,
        } => {
            let mut body = serde_json::json!({ "address": address });
            if let Some(s) = scope {
                body["scope"] = s.into();
            }
            if let Some(r) = reason {
                body["reason"] = r.into();
            }
            if let Some(e) = expires_after_s {
                body["expires_after_s"] = e.into();
            }
            sc::add(&client, body, json).map_err(|e| e.to_string())?
        }
        SuppressCommand::Remove { address, scope, json } => {
            sc::remove(&client, &address, scope.as_deref(), json).map_err(|e| e.to_string())?
        }
        SuppressCommand::Import { file, json } => {
            let csv = std::fs::read(&file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
            sc::import(
                &client,
                &file.display().to_string(),
                &csv,
                config.suppression.import_rows_max,
                json,
            )?
        }
        SuppressCommand::Export { out } => {
            let csv = sc::export(&client).map_err(|e| e.to_string())?;
            match out {
                Some(path) => {
                    std::fs::write(&path, &csv).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
                    eprintln!("wrote {} bytes to {}", csv.len(), path.display());
                }
                None => std::io::stdout().write_all(&csv).map_err(|e| e.to_string())?,
            }
            return Ok(());
        }
    };
    print!("{answer}");
    Ok(())
}

/// An action through the API (these need the running server).
fn act(
    client: Result<client::Client, CallError>,
    action: Action,
    filter: Filter,
    reason: Option<&str>,
    json: bool,
) -> Result<String, String> {
    client
        .and_then(|c| client::act(&c, action, &filter.selector(), reason, json))
        .map_err(|e| e.to_string())
}

fn queue_flush(config: &Config) -> Result<(), String> {
    let pid = signal_server(config, libc::SIGUSR1, "flush")?;
    eprintln!("asked gannet (pid {pid}) to retry its deferred mail now");
    Ok(())
}

fn passwd(user: &str, addresses: Option<&str>) -> Result<(), String> {
    if user.is_empty() || user.contains(':') || user.len() > gannet::smtp::sasl::USER_BYTES_MAX {
        return Err(format!(
            "`{user}` cannot be a user name: it must be 1 to {} bytes without `:`",
            gannet::smtp::sasl::USER_BYTES_MAX
        ));
    }
    let password = if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        let first = rpassword::prompt_password(format!("Password for {user}: ")).map_err(|e| e.to_string())?;
        let again = rpassword::prompt_password("Again: ").map_err(|e| e.to_string())?;
        if first != again {
            return Err("the passwords differ".into());
        }
        first
    } else {
        let mut line = String::new();
        std::io::stdin()
            .read_line(&mut line)
            .map_err(|e| format!("cannot read the password: {e}"))?;
        line.trim_end_matches(['\r', '\n']).to_string()
    };
    if password.is_empty() || password.len() > gannet::smtp::sasl::PASSWORD_BYTES_MAX {
        return Err(format!(
            "the password must be 1 to {} bytes",
            gannet::smtp::sasl::PASSWORD_BYTES_MAX
        ));
    }
    let hash = gannet::auth::passwords::hash_password(password.as_bytes())?;
    let line = match addresses {
        Some(list) => format!("{user}:{hash}:{list}"),
        None => format!("{user}:{hash}"),
    };
    // Check the line the way the server will read it.
    gannet::auth::passwords::PasswordFile::parse(&line, "the new line")?;
    println!("{line}");
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("gannet: {message}");
            ExitCode::from(2)
        }
    }
}

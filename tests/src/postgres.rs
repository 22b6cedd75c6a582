//! The PostgreSQL server under test: a private cluster, or an existing one named by the
//! environment.
//!
//! A private cluster is `initdb` + `postgres` in the foreground under a watchdog, data dir and unix
//! socket in a temp dir, a free port on 127.0.0.1, trust auth and durability switched off (a test
//! cluster never survives a crash anyway). Postgres refuses to run as root, so as root both run as
//! the `postgres` system user. Each test gets a fresh database.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use sqlx::{AssertSqlSafe, Connection};

use crate::watchdog::{self, Spec, Watchdog};
use crate::{DATABASE_URL_ENV, free_port, urls};

const BOOT_DEADLINE: Duration = Duration::from_secs(60);
/// System user that owns a private cluster when the tests run as root.
const SYSTEM_USER: &str = "postgres";

/// A PostgreSQL server reachable through an admin URL.
pub struct Postgres {
    /// `postgres://user@host:port/db` of a database the kit may run `CREATE DATABASE` in.
    admin_url: String,
    /// Set when this process started the cluster.
    server: Option<Watchdog>,
}

/// A private cluster's TLS: `ssl=on` with this certificate and key (PEM). With `required`,
/// `pg_hba.conf` accepts TCP connections over TLS only (`hostssl`), so a test can tell a
/// connection that really uses TLS from one that quietly fell back to plaintext.
pub struct PgTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub required: bool,
}

/// A database created for one test. Derefs to its URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Database {
    pub name: String,
    /// `postgres://postgres@127.0.0.1:<port>/<name>`
    pub url: String,
}

url_newtype!(Database);

impl Postgres {
    /// The server named by `RECHECK_TEST_DATABASE_URL`, if set.
    pub fn from_env() -> Option<Self> {
        let admin_url = std::env::var(DATABASE_URL_ENV).ok().filter(|s| !s.is_empty())?;
        Some(Self { admin_url, server: None })
    }

    /// Creates and starts a private cluster and waits until it accepts connections. Blocking.
    pub fn start_private() -> Result<Self> {
        Self::start_private_with(None)
    }

    /// [`Self::start_private`], serving TLS when `tls` is given. Blocking.
    pub fn start_private_with(tls: Option<&PgTls>) -> Result<Self> {
        let bin = find_bin().context(crate::INSTALL_HINT)?;
        let dir = tempfile::Builder::new()
            .prefix("recheck-pg-")
            .tempdir()
            .context("creating a temp dir for PostgreSQL")?
            .keep();
        let as_root = is_root();
        if as_root {
            let status = Command::new("chown")
                .arg(format!("{SYSTEM_USER}:"))
                .arg(&dir)
                .status()
                .context("running chown")?;
            if !status.success() {
                let _ = std::fs::remove_dir_all(&dir);
                bail!("chown {SYSTEM_USER}: {} failed ({status})", dir.display());
            }
        }
        let data = dir.join("data");
        let command = |program: &str| {
            let program = bin.join(program);
            let mut command = if as_root {
                let mut c = Command::new("setpriv");
                c.args(["--reuid", SYSTEM_USER, "--regid", SYSTEM_USER, "--init-groups", "--"]).arg(program);
                c
            } else {
                Command::new(program)
            };
            command.current_dir(&dir);
            command
        };

        let output = command("initdb")
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-locale", "--no-sync"])
            .output()
            .context("running initdb")?;
        if !output.status.success() {
            let _ = std::fs::remove_dir_all(&dir);
            bail!(
                "initdb failed ({}): {}{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }

        let mut settings = vec![
            "listen_addresses=127.0.0.1".to_owned(),
            format!("unix_socket_directories={}", dir.display()),
            "fsync=off".to_owned(),
            "synchronous_commit=off".to_owned(),
            "full_page_writes=off".to_owned(),
            "max_connections=200".to_owned(),
            "shared_buffers=32MB".to_owned(),
        ];
        if let Some(tls) = tls {
            let files = serve_tls(&dir, &data, tls, as_root).inspect_err(|_| {
                let _ = std::fs::remove_dir_all(&dir);
            })?;
            settings.extend(files);
        }

        let port = free_port()?;
        let mut postgres = command("postgres");
        postgres.arg("-D").arg(&data).arg("-p").arg(port.to_string());
        for setting in settings {
            postgres.arg("-c").arg(setting);
        }
        let log = dir.join("postgres.log");
        let server = Watchdog::spawn(Spec {
            command: postgres,
            // SIGINT = fast shutdown; SIGTERM would wait for every client to disconnect.
            stop_signal: "INT",
            dir: &dir,
            log: &log,
            cleanup: String::new(),
        })?;
        let pg = Self {
            admin_url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
            server: Some(server),
        };
        match pg.await_boot(&bin, port) {
            Ok(()) => {
                tracing::info!(url = %pg.admin_url, dir = %dir.display(), "private PostgreSQL up");
                Ok(pg)
            }
            Err(e) => {
                let logs = watchdog::tail(&log, 30);
                if let Some(server) = pg.server {
                    let _ = server.stop(Duration::from_secs(30));
                }
                Err(anyhow!("private PostgreSQL did not start: {e:#}\n{logs}"))
            }
        }
    }

    fn await_boot(&self, bin: &Path, port: u16) -> Result<()> {
        let started = Instant::now();
        loop {
            if let Some(status) = self.server.as_ref().and_then(Watchdog::server_exit) {
                bail!("postgres exited with status {status}");
            }
            let ready = Command::new(bin.join("pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-p", &port.to_string()])
                .status()
                .context("running pg_isready")?;
            if ready.success() {
                return Ok(());
            }
            if started.elapsed() > BOOT_DEADLINE {
                bail!("not accepting connections on port {port} after {BOOT_DEADLINE:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// URL of the admin database (`postgres`), where databases are created.
    pub fn admin_url(&self) -> &str {
        &self.admin_url
    }

    /// Lines for an env file that points other processes at this server.
    pub fn env_lines(&self) -> Vec<(&'static str, String)> {
        vec![(DATABASE_URL_ENV, self.admin_url.clone())]
    }

    /// `CREATE DATABASE test_<uuid>` and its URL.
    pub async fn fresh_database(&self) -> Result<Database> {
        let name = format!("test_{}", uuid::Uuid::now_v7().simple());
        let mut conn = sqlx::PgConnection::connect(&self.admin_url)
            .await
            .with_context(|| format!("connecting to {}", self.admin_url))?;
        sqlx::query(AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .execute(&mut conn)
            .await
            .with_context(|| format!("CREATE DATABASE {name}"))?;
        let _ = conn.close().await;
        let url = urls::with_path(&self.admin_url, &name);
        Ok(Database { name, url })
    }

    /// Runs an SQL file with `psql` (psql's meta-commands included) as the admin user, stopping
    /// at the first error, as an image runs its init scripts. Blocking.
    pub fn run_sql_file(&self, file: &Path) -> Result<()> {
        let output = Command::new(find_bin()?.join("psql"))
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", &self.admin_url, "-f"])
            .arg(file)
            .output()
            .context("running psql")?;
        if !output.status.success() {
            bail!(
                "psql -f {} failed ({}): {}",
                file.display(),
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(())
    }

    /// Stops a private cluster and removes its files (no-op for a server from the environment).
    pub fn shutdown(self) -> Result<()> {
        match self.server {
            Some(server) => server.stop(Duration::from_secs(60)),
            None => Ok(()),
        }
    }
}

/// Copies the certificate and key into the cluster's dir (postgres wants its key private and
/// owned by the server's user) and returns the settings that serve them; with `required`, turns
/// every TCP line of `pg_hba.conf` into `hostssl`.
fn serve_tls(dir: &Path, data: &Path, tls: &PgTls, as_root: bool) -> Result<Vec<String>> {
    use std::os::unix::fs::PermissionsExt;
    let (cert, key) = (dir.join("server.crt"), dir.join("server.key"));
    std::fs::copy(&tls.cert, &cert).context("copying the server certificate")?;
    std::fs::copy(&tls.key, &key).context("copying the server key")?;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))?;
    if as_root {
        let status = Command::new("chown").arg(format!("{SYSTEM_USER}:")).arg(&cert).arg(&key).status()?;
        anyhow::ensure!(status.success(), "chown of the server certificate failed ({status})");
    }
    if tls.required {
        // Rewritten in place, so the file keeps its owner.
        let hba = data.join("pg_hba.conf");
        let text = std::fs::read_to_string(&hba).context("reading pg_hba.conf")?;
        let lines: Vec<String> = text
            .lines()
            .map(|line| match line.strip_prefix("host ") {
                Some(rest) => format!("hostssl {rest}"),
                None => line.to_owned(),
            })
            .collect();
        std::fs::write(&hba, lines.join("\n") + "\n").context("writing pg_hba.conf")?;
    }
    Ok(vec![
        "ssl=on".to_owned(),
        format!("ssl_cert_file={}", cert.display()),
        format!("ssl_key_file={}", key.display()),
    ])
}

/// Newest `/usr/lib/postgresql/<version>/bin` (Debian), else the directory of `initdb` on PATH.
fn find_bin() -> Result<PathBuf> {
    let debian = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version: u32 = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .max_by_key(|(version, _)| *version);
    if let Some((_, bin)) = debian {
        return Ok(bin);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .find(|dir| dir.join("initdb").exists() && dir.join("postgres").exists())
        .context(
            "PostgreSQL server binaries (initdb, postgres) not found in /usr/lib/postgresql/*/bin or PATH",
        )
}

/// Root check without libc: the owner of `/proc/self` is the process's effective uid.
fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

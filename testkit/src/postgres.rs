//! Real PostgreSQL servers from Debian's `postgresql` package, for the store on PostgreSQL: a
//! primary (`initdb` in a temp dir, a free port on loopback, trust authentication for the user
//! `eventbus`) and standbys streaming from it (`pg_basebackup -R`), synchronous when asked. Each is
//! killed (-9) when dropped. PostgreSQL refuses to run as root, so as root (CI) every command runs
//! as the package's `postgres` user through `setpriv`, which execs: the process killed is the
//! postmaster itself.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;

/// The database user the servers trust.
pub const USER: &str = "eventbus";

pub struct Postgres {
    child: Option<Child>,
    pub port: u16,
    data: PathBuf,
    _dir: tempfile::TempDir,
}

/// The newest installed PostgreSQL's programs.
fn bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL is not installed (apt-get install postgresql)")
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let version = e.file_name().to_str()?.parse().ok()?;
                Some((version, e.path().join("bin")))
            })
            .filter(|(_, bin)| bin.join("postgres").exists())
            .collect();
        versions.sort();
        versions
            .pop()
            .expect("no PostgreSQL server under /usr/lib/postgresql")
            .1
    })
}

fn is_root() -> bool {
    static ROOT: OnceLock<bool> = OnceLock::new();
    *ROOT.get_or_init(|| {
        Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
    })
}

/// A PostgreSQL program, run as `postgres` when we are root.
fn program(name: &str) -> Command {
    let path = bin_dir().join(name);
    if is_root() {
        let mut command = Command::new("setpriv");
        command
            .args([
                "--reuid=postgres",
                "--regid=postgres",
                "--init-groups",
                "--reset-env",
            ])
            .arg(path);
        command
    } else {
        Command::new(path)
    }
}

fn run(mut command: Command, what: &str) {
    let output = command
        .output()
        .unwrap_or_else(|err| panic!("{what}: {err}"));
    assert!(
        output.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A temp dir the server's user may write.
fn own_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    if is_root() {
        let mut chown = Command::new("chown");
        chown.args(["postgres:postgres"]).arg(dir.path());
        run(chown, "chown");
    }
    dir
}

impl Postgres {
    /// A primary, ready for connections and for standbys.
    pub async fn primary() -> Postgres {
        let dir = own_dir();
        let data = dir.path().join("data");
        let mut initdb = program("initdb");
        initdb
            .args([
                "--auth=trust",
                "--encoding=UTF8",
                "--no-sync",
                "-U",
                USER,
                "-D",
            ])
            .arg(&data);
        run(initdb, "initdb");
        let port = crate::free_port();
        configure(&data, dir.path(), port);
        let mut server = Postgres {
            child: None,
            port,
            data,
            _dir: dir,
        };
        server.spawn().await;
        server
    }

    /// A standby streaming from `primary`; with `synchronous`, the primary's commits wait for it.
    pub async fn standby(primary: &Postgres, synchronous: bool) -> Postgres {
        let dir = own_dir();
        let data = dir.path().join("data");
        let mut backup = program("pg_basebackup");
        backup
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &primary.port.to_string(),
                "-U",
                USER,
            ])
            .args(["-R", "-X", "stream", "--no-sync", "-D"])
            .arg(&data);
        run(backup, "pg_basebackup");
        let port = crate::free_port();
        configure(&data, dir.path(), port);
        let mut server = Postgres {
            child: None,
            port,
            data,
            _dir: dir,
        };
        server.spawn().await;
        if synchronous {
            primary.sql("ALTER SYSTEM SET synchronous_standby_names = '*'");
            primary.sql("SELECT pg_reload_conf()");
            crate::eventually("the standby to be synchronous", || async {
                let state = primary.sql("SELECT sync_state FROM pg_stat_replication");
                (state.trim() == "sync").then_some(())
            })
            .await;
        }
        server
    }

    /// `postgres://eventbus@127.0.0.1:<port>/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://{USER}@127.0.0.1:{}/postgres", self.port)
    }

    /// Runs `sql` with psql; its output, unaligned, without headers.
    pub fn sql(&self, sql: &str) -> String {
        Self::sql_at(&self.url(), sql)
    }

    /// Runs `sql` with psql against `url` (a multi-host URL too).
    pub fn sql_at(url: &str, sql: &str) -> String {
        let output = Command::new(bin_dir().join("psql"))
            .args([
                "-X",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                url,
                "-c",
                sql,
            ])
            .output()
            .expect("psql");
        assert!(
            output.status.success(),
            "psql {sql:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Turns TLS on, with a certificate for localhost and 127.0.0.1 signed by `ca`; returns once
    /// new connections are offered it. Plain connections stay allowed (what the server does when
    /// `sslmode` asks for no TLS is the client's choice).
    pub async fn serve_tls(&self, ca: &crate::tls::TestCa) {
        let (cert, key) = (self.data.join("server.crt"), self.data.join("server.key"));
        ca.write_server_pair(&cert, &key);
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        if is_root() {
            let mut chown = Command::new("chown");
            chown.args(["postgres:postgres"]).arg(&cert).arg(&key);
            run(chown, "chown");
        }
        self.sql("ALTER SYSTEM SET ssl = on");
        self.sql("SELECT pg_reload_conf()");
        crate::eventually("PostgreSQL to offer TLS", || async {
            (self.sql("SHOW ssl").trim() == "on").then_some(())
        })
        .await;
    }

    /// Makes a standby the primary, and waits until it takes writes.
    pub async fn promote(&self) {
        let mut promote = program("pg_ctl");
        promote.args(["promote", "-w", "-D"]).arg(&self.data);
        run(promote, "pg_ctl promote");
        crate::eventually("the promoted standby to take writes", || async {
            (self.sql("SELECT pg_is_in_recovery()").trim() == "f").then_some(())
        })
        .await;
    }

    /// `kill -9` of the server, as when its machine dies: the postmaster, then every process
    /// still working in its data directory (each backend is a session of its own, so a process
    /// group does not hold them; killing the postmaster alone leaves its backends committing for
    /// their clients until they notice). No checkpoint, no goodbye to clients.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            let data = std::fs::canonicalize(&self.data).unwrap_or_else(|_| self.data.clone());
            // Backends exit by themselves soon after; until then, none may answer a client.
            for _ in 0..50 {
                let left: Vec<String> = std::fs::read_dir("/proc")
                    .into_iter()
                    .flatten()
                    .filter_map(Result::ok)
                    .filter(|entry| {
                        std::fs::read_link(entry.path().join("cwd")).is_ok_and(|cwd| cwd == data)
                    })
                    .filter_map(|entry| entry.file_name().into_string().ok())
                    .collect();
                if left.is_empty() {
                    break;
                }
                let _ = Command::new("kill").arg("-9").args(&left).status();
            }
        }
    }

    async fn spawn(&mut self) {
        let log = std::fs::File::create(self.data.with_file_name("postgres.log")).ok();
        let mut postgres = program("postgres");
        postgres.arg("-D").arg(&self.data).stdout(Stdio::null());
        match log {
            Some(log) => postgres.stderr(log),
            None => postgres.stderr(Stdio::null()),
        };
        self.child = Some(postgres.spawn().expect("start postgres"));
        let port = self.port.to_string();
        crate::eventually("postgres to accept connections", || async {
            let ready = Command::new(bin_dir().join("pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-p", &port])
                .status()
                .is_ok_and(|s| s.success());
            ready.then_some(())
        })
        .await;
    }
}

/// The settings of a test server: loopback on `port`, its socket in `dir`, ready to stream WAL
/// to standbys, and durable as production runs it (fsync, synchronous_commit on).
fn configure(data: &Path, dir: &Path, port: u16) {
    use std::io::Write;
    let mut conf = std::fs::OpenOptions::new()
        .append(true)
        .open(data.join("postgresql.conf"))
        .expect("postgresql.conf");
    writeln!(
        conf,
        "\nlisten_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{}'\n\
         wal_level = replica\nmax_wal_senders = 8\nhot_standby = on\nfsync = on\n\
         synchronous_commit = on\nshared_buffers = 32MB\nmax_connections = 100\n",
        dir.display()
    )
    .expect("write postgresql.conf");
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.kill();
    }
}

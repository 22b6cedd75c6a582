//! `demo --keep`: after the report the services stay up, and the demo says where to look — the
//! dashboard, the Admin API with a few admin CLI commands on real message ids of the run, and a
//! second load to watch the dashboard move — until Ctrl-C.

use std::fmt::{self, Display, Formatter};
use std::path::{Path, PathBuf};

use recheck_proto::v1::{ListMessagesRequest, Message, MessageStatus, admin_client::AdminClient};

use crate::deploy::{Deployment, Role};

/// Where the kept services are, and what to try on them.
#[derive(Debug, Clone)]
pub struct KeepInfo {
    /// `http://127.0.0.1:<ops port>/dashboard` of the callback service.
    pub dashboard: String,
    pub metrics: String,
    /// The callback service's gRPC address (Admin API).
    pub admin_addr: String,
    /// upstream-demo's gRPC address (Orders).
    pub orders_addr: String,
    /// The directory of the binaries, relative to the working directory when inside it.
    pub bin: PathBuf,
    /// The services' logs and SQLite stores.
    pub dir: PathBuf,
    /// A confirmed message that was resent (a CONFIRM went missing), and a rejected one.
    pub resent_id: Option<String>,
    pub rejected_id: Option<String>,
    /// The demo started the RabbitMQ node, so Ctrl-C stops it too.
    pub private_node: bool,
}

impl KeepInfo {
    /// Reads the ports off `deployment` and picks two message ids through the Admin API (none
    /// if it does not answer: the commands are shown without them).
    pub async fn gather(deployment: &Deployment, bin_dir: &Path, private_node: bool) -> Self {
        let ops = deployment.ops_addr(Role::Callback(0));
        let admin_addr = format!("http://127.0.0.1:{}", deployment.callback_ports[0]);
        let (resent_id, rejected_id) = pick_ids(&admin_addr).await.unwrap_or_default();
        Self {
            dashboard: format!("http://{ops}/dashboard"),
            metrics: format!("http://{ops}/metrics"),
            orders_addr: format!("http://127.0.0.1:{}", deployment.orders_port),
            admin_addr,
            bin: relative(bin_dir),
            dir: relative(&deployment.dir),
            resent_id,
            rejected_id,
            private_node,
        }
    }
}

/// A confirmed message resent at least once (among the newest 500), and a rejected one.
async fn pick_ids(admin_addr: &str) -> anyhow::Result<(Option<String>, Option<String>)> {
    let mut admin = AdminClient::connect(admin_addr.to_owned()).await?;
    let confirmed = first_page(&mut admin, MessageStatus::Confirmed, 500).await?;
    let resent = confirmed.into_iter().find(|m| m.resend_count > 0).map(|m| m.message_id);
    let rejected = first_page(&mut admin, MessageStatus::Rejected, 1).await?;
    Ok((resent, rejected.into_iter().next().map(|m| m.message_id)))
}

async fn first_page(
    admin: &mut AdminClient<tonic::transport::Channel>,
    status: MessageStatus,
    page_size: u32,
) -> anyhow::Result<Vec<Message>> {
    let request = ListMessagesRequest { status: status as i32, page_size, page_token: String::new() };
    Ok(admin.list_messages(request).await?.into_inner().messages)
}

/// `path` relative to the working directory when it lies inside it (`target/release`).
fn relative(path: &Path) -> PathBuf {
    let cwd = std::env::current_dir().ok().and_then(|d| d.canonicalize().ok());
    let path = path.canonicalize().unwrap_or_else(|_| path.to_owned());
    match cwd.as_deref().and_then(|cwd| path.strip_prefix(cwd).ok()) {
        Some(inside) if !inside.as_os_str().is_empty() => inside.to_owned(),
        _ => path,
    }
}

impl Display for KeepInfo {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        let callback = self.bin.join("callback-service");
        let callback = callback.display();
        let upstream = self.bin.join("upstream-demo");
        let node = if self.private_node { " and the RabbitMQ node" } else { "" };
        writeln!(f, "The services are still running. Ctrl-C stops them{node}.")?;
        writeln!(f)?;
        writeln!(f, "  dashboard   {}", self.dashboard)?;
        writeln!(f, "  metrics     {}", self.metrics)?;
        writeln!(f, "  Admin API   {}  (gRPC)", self.admin_addr)?;
        writeln!(f, "  logs        {}/*.log", self.dir.display())?;
        writeln!(f)?;
        writeln!(f, "Try the admin CLI:")?;
        writeln!(f)?;
        writeln!(f, "  export RECHECK_ADMIN_ADDR={}", self.admin_addr)?;
        writeln!(f, "  {callback} admin stats")?;
        writeln!(f, "  {callback} admin list --status rejected --page-size 5")?;
        match &self.resent_id {
            Some(id) => writeln!(f, "  {callback} admin show {id}   # resent: a CONFIRM was missing")?,
            None => writeln!(f, "  {callback} admin show <message id>")?,
        }
        match &self.rejected_id {
            Some(id) => writeln!(
                f,
                "  {callback} admin redrive {id}   # rejected: checked again, resent, rejected again"
            )?,
            None => writeln!(f, "  {callback} admin redrive <id of a failed or rejected message>")?,
        }
        writeln!(f)?;
        writeln!(f, "More orders, to watch the dashboard move (100 a second for 30 s):")?;
        writeln!(f)?;
        writeln!(
            f,
            "  {} load --addr {} --admin-addr {} --count 3000 --rate 100 --skip-publish-rate 0.05",
            upstream.display(),
            self.orders_addr,
            self.admin_addr
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_commands_name_the_binaries_and_the_ids() {
        let info = KeepInfo {
            dashboard: "http://127.0.0.1:9051/dashboard".into(),
            metrics: "http://127.0.0.1:9051/metrics".into(),
            admin_addr: "http://127.0.0.1:50051".into(),
            orders_addr: "http://127.0.0.1:50061".into(),
            bin: "target/release".into(),
            dir: "target/demo".into(),
            resent_id: Some("0199-resent".into()),
            rejected_id: None,
            private_node: true,
        };
        let shown = info.to_string();
        for expected in [
            "dashboard   http://127.0.0.1:9051/dashboard",
            "export RECHECK_ADMIN_ADDR=http://127.0.0.1:50051",
            "target/release/callback-service admin stats",
            "target/release/callback-service admin show 0199-resent",
            "target/release/callback-service admin redrive <id of a failed or rejected message>",
            "target/release/upstream-demo load --addr http://127.0.0.1:50061 --admin-addr http://127.0.0.1:50051",
            "Ctrl-C stops them and the RabbitMQ node.",
        ] {
            assert!(shown.contains(expected), "missing {expected:?} in:\n{shown}");
        }
    }
}

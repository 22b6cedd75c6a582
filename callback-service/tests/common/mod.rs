//! What the store suites share.

/// Runs a scenario once on SQLite and once on PostgreSQL, as two tests; the scenario gets two
/// fresh stores' URLs.
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
                let urls = dirs.each_ref().map(|d| format!("sqlite://{}/callback.db?mode=rwc", d.path().display()));
                super::$name(&urls).await;
            })*
        }
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let kit = recheck_tests::kit().await;
                let urls = [
                    kit.postgres.fresh_database().await.unwrap().url,
                    kit.postgres.fresh_database().await.unwrap().url,
                ];
                super::$name(&urls).await;
            })*
        }
    };
}

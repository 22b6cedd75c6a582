//! `Inbox::claim_many` / `prior_many` on SQLite (the PostgreSQL side runs in the `consumer`
//! suite): the batched claim decides exactly what one `claim` per delivery would.

use recheck::{Inbox, inbox::Prior, message::Outcome};
use sqlx::{AnyPool, any::AnyPoolOptions};
use uuid::Uuid;

async fn store() -> AnyPool {
    sqlx::any::install_default_drivers();
    // One connection: each in-memory SQLite connection is its own database.
    let pool = AnyPoolOptions::new().max_connections(1).connect("sqlite::memory:").await.unwrap();
    Inbox::migrate(&pool).await.unwrap();
    pool
}

#[tokio::test]
async fn batched_claims_count_every_copy_and_apply_each_id_once() {
    let pool = store().await;
    let inbox = Inbox::new("points");
    let [a, b, c, d] = [(); 4].map(|_| Uuid::now_v7());

    let mut tx = pool.begin().await.unwrap();
    // The same id twice in one batch: first-seen once, its second copy counted as a duplicate.
    let first = inbox.claim_many(&mut tx, &[a, b, a, c]).await.unwrap();
    assert_eq!(first, [a, b, c].into());
    tx.commit().await.unwrap();
    assert_eq!(inbox.counts(&pool).await.unwrap(), (3, 1));

    let mut tx = pool.begin().await.unwrap();
    assert_eq!(inbox.claim_many(&mut tx, &[a, d, d]).await.unwrap(), [d].into());
    // The single claim and the batched one agree.
    assert!(!inbox.claim(&mut tx, d).await.unwrap());
    assert_eq!(inbox.claim_many(&mut tx, &[]).await.unwrap(), [].into());
    tx.commit().await.unwrap();
    assert_eq!(inbox.counts(&pool).await.unwrap(), (4, 4));

    // A rolled-back claim leaves nothing behind.
    let e = Uuid::now_v7();
    let mut tx = pool.begin().await.unwrap();
    assert_eq!(inbox.claim_many(&mut tx, &[e, a]).await.unwrap(), [e].into());
    tx.rollback().await.unwrap();
    assert_eq!(inbox.counts(&pool).await.unwrap(), (4, 4));
}

#[tokio::test]
async fn prior_outcomes_in_one_read() {
    let pool = store().await;
    let inbox = Inbox::new("points");
    let other = Inbox::new("ledger");
    let [a, b, unknown] = [(); 3].map(|_| Uuid::now_v7());
    let mut tx = pool.begin().await.unwrap();
    inbox.claim_many(&mut tx, &[a, b]).await.unwrap();
    inbox.mark_rejected(&mut tx, b, "customer blocked").await.unwrap();
    other.claim_many(&mut tx, &[unknown]).await.unwrap();

    let prior = inbox.prior_many(&mut tx, &[a, b, unknown]).await.unwrap();
    assert_eq!(prior.len(), 2, "another consumer's row is not ours: {prior:?}");
    assert_eq!(prior[&a], Prior { outcome: Outcome::Processed, detail: None });
    assert_eq!(prior[&b], Prior { outcome: Outcome::Rejected, detail: Some("customer blocked".into()) });
    assert_eq!(inbox.prior(&mut tx, b).await.unwrap().as_ref(), prior.get(&b));
}

#[tokio::test]
async fn more_ids_than_one_statement_holds() {
    let pool = store().await;
    let inbox = Inbox::new("points");
    let ids: Vec<Uuid> = (0..700).map(|_| Uuid::now_v7()).collect();
    // Copies spread over the whole batch, so they fall in other chunks' positions too.
    let batch: Vec<Uuid> = ids.iter().chain(ids.iter().step_by(7)).copied().collect();
    let mut tx = pool.begin().await.unwrap();
    let first = inbox.claim_many(&mut tx, &batch).await.unwrap();
    assert_eq!(first.len(), ids.len());
    assert_eq!(inbox.prior_many(&mut tx, &ids).await.unwrap().len(), ids.len());
    assert!(inbox.claim_many(&mut tx, &ids[..300]).await.unwrap().is_empty());
    tx.commit().await.unwrap();
    assert_eq!(inbox.counts(&pool).await.unwrap(), (700, 100 + 300));
}

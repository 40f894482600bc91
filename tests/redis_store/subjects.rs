//! Subjects on Redis: fenced writes, listing, sweeping order and counts from
//! the advisory index, one lease holder per subject, one-time entries taken
//! once across processes, and the Cluster-ready key layout.

use std::time::{Duration, SystemTime};

use tokenproxy::secret::Secret;
use tokenproxy::store::{
    Saved, Store, SubjectLoad, SubjectMeta, SubjectRecord, SubjectStatus, SubjectStore, TokenState,
};

use super::{temp_dir, Redis, KEY};

/// A store on `redis` (as one process opens it) and its client `pos`'s subjects.
fn subjects(redis: &Redis) -> SubjectStore {
    let text = format!(
        r#"
[store]
kind = "redis"
url = "{url}"
key_prefix = "test"
key = "{KEY}"

[clients.pos]
listen = "127.0.0.1:0"
upstream = "http://127.0.0.1:1"

[clients.pos.token]
url = "https://auth.example/token"
client_id = "pos"
client_secret = "s3cret"
"#,
        url = redis.url()
    );
    let config = tokenproxy::config::from_str(&text, None, &tokenproxy::config::MapEnv::new())
        .expect("test config is valid");
    Store::open(&config.store)
        .expect("store")
        .subjects(&config.clients[0])
}

fn meta(status: SubjectStatus, due_at_ms: Option<u64>) -> SubjectMeta {
    SubjectMeta {
        status,
        connected_at_ms: 1_700_000_000_000,
        access_expires_at_ms: None,
        refresh_expires_at_ms: None,
        last_refresh_at_ms: None,
        last_outcome: None,
        reason: None,
        due_at_ms,
    }
}

fn record(generation: u64, access: &str, meta: SubjectMeta) -> SubjectRecord {
    SubjectRecord {
        generation,
        meta,
        tokens: TokenState {
            access_token: Some(Secret::new(access)),
            access_expires_at: None,
            lifetime: Some(Duration::from_secs(60)),
            refresh_token: Some(Secret::new(format!("{access}-refresh"))),
            refresh_expires_at: None,
            obtained_at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        },
        dpop_key: None,
    }
}

fn valid(generation: u64, access: &str) -> SubjectRecord {
    record(generation, access, meta(SubjectStatus::Valid, None))
}

async fn found(subjects: &SubjectStore, subject: &str) -> SubjectRecord {
    match subjects.get(subject).await {
        Ok(SubjectLoad::Found(r)) => *r,
        other => panic!("{subject} should be stored and open, got {other:?}"),
    }
}

async fn keys(redis: &Redis, pattern: &str) -> Vec<String> {
    let mut c = redis.connection().await;
    let mut keys: Vec<String> = redis::cmd("KEYS")
        .arg(pattern)
        .query_async(&mut c)
        .await
        .expect("KEYS");
    keys.sort();
    keys
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subject_writes_are_fenced_across_processes_and_keyed_for_a_cluster() {
    if !super::redis_installed() {
        return;
    }
    let redis = Redis::start(temp_dir("subjects-fence"));
    let (sidecar, cli) = (subjects(&redis), subjects(&redis));
    assert!(matches!(sidecar.get("m-1").await, Ok(SubjectLoad::Missing)));
    assert_eq!(
        cli.put("m-1", &valid(1, "imported")).await.unwrap(),
        Saved::Written
    );
    assert_eq!(found(&sidecar, "m-1").await, valid(1, "imported"));
    assert_eq!(
        sidecar.put("m-1", &valid(2, "refreshed")).await.unwrap(),
        Saved::Written
    );
    for generation in [1, 2] {
        assert_eq!(
            cli.put("m-1", &valid(generation, "late")).await.unwrap(),
            Saved::Stale { generation: 2 },
            "generation {generation} must not overwrite the stored generation 2"
        );
    }
    assert_eq!(found(&cli, "m-1").await, valid(2, "refreshed"));

    // One hash tag per subject, one per client's index.
    let record = keys(&redis, "test:{pos:*:m-1}:subject").await;
    assert_eq!(
        record.len(),
        1,
        "the record lives under its own hash tag: {record:?}"
    );
    let index = keys(&redis, "test:{pos:*}:subjects").await;
    assert_eq!(index.len(), 1, "the client's index: {index:?}");
    let mut c = redis.connection().await;
    let stored: Vec<String> = redis::cmd("HVALS")
        .arg(&record[0])
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(
        !stored.iter().any(|v| v.contains("refreshed")),
        "tokens must be sealed in Redis: {stored:?}"
    );

    // A record edited into something else does not open, and fences nothing.
    let _: () = redis::cmd("HSET")
        .arg(&record[0])
        .arg("generation")
        .arg("junk")
        .query_async(&mut c)
        .await
        .unwrap();
    match cli.get("m-1").await {
        Ok(SubjectLoad::NotOpened { problem, .. }) => {
            assert!(problem.contains("not a whole number"), "{problem}")
        }
        other => panic!("an edited record should not open, got {other:?}"),
    }
    assert_eq!(
        cli.put("m-1", &valid(1, "again")).await.unwrap(),
        Saved::Written
    );
    assert_eq!(found(&sidecar, "m-1").await, valid(1, "again"));

    assert!(sidecar.delete("m-1").await.unwrap());
    assert!(
        !cli.delete("m-1").await.unwrap(),
        "already deleted by the other"
    );
    assert!(matches!(cli.get("m-1").await, Ok(SubjectLoad::Missing)));
    assert!(
        cli.list(None, None, 10).await.unwrap().is_empty(),
        "the index entry goes too"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subjects_are_listed_swept_and_counted_from_the_index_checked_against_records() {
    if !super::redis_installed() {
        return;
    }
    let redis = Redis::start(temp_dir("subjects-list"));
    let store = subjects(&redis);
    let dead = |g| record(g, "x", meta(SubjectStatus::NeedsAuthorization, None));
    let due = |g, at| record(g, "x", meta(SubjectStatus::Valid, Some(at)));
    for (id, r) in [
        ("m-5", due(1, 5_000)),
        ("m-2", dead(1)),
        ("m-1", due(1, 1_000)),
        ("m-4", dead(1)),
        ("m-3", due(1, 1_000)),
        ("m-6", valid(1, "idle")),
    ] {
        assert_eq!(store.put(id, &r).await.unwrap(), Saved::Written);
    }
    let ids = |page: Vec<(String, SubjectMeta)>| -> Vec<String> {
        page.into_iter().map(|(s, _)| s).collect()
    };
    assert_eq!(
        ids(store.list(None, None, 2).await.unwrap()),
        ["m-1", "m-2"]
    );
    assert_eq!(
        ids(store.list(None, Some("m-2"), 3).await.unwrap()),
        ["m-3", "m-4", "m-5"],
        "the next page starts strictly after the cursor"
    );
    assert_eq!(
        ids(store
            .list(Some(SubjectStatus::NeedsAuthorization), None, 10)
            .await
            .unwrap()),
        ["m-2", "m-4"]
    );
    let until = |ms| SystemTime::UNIX_EPOCH + Duration::from_millis(ms);
    assert_eq!(
        store.due(until(5_000), 10).await.unwrap(),
        ["m-1", "m-3", "m-5"],
        "earliest first, ties by id, never-due subjects left out"
    );
    assert_eq!(store.due(until(5_000), 1).await.unwrap(), ["m-1"]);
    let counts = store.count().await.unwrap();
    assert_eq!(counts.get(&SubjectStatus::Valid), Some(&4), "{counts:?}");
    assert_eq!(
        counts.get(&SubjectStatus::NeedsAuthorization),
        Some(&2),
        "{counts:?}"
    );

    // A status change and a reschedule move the subject in the index.
    assert_eq!(
        store.put("m-2", &due(2, 500)).await.unwrap(),
        Saved::Written
    );
    assert_eq!(
        ids(store
            .list(Some(SubjectStatus::NeedsAuthorization), None, 10)
            .await
            .unwrap()),
        ["m-4"]
    );
    assert_eq!(store.due(until(999), 10).await.unwrap(), ["m-2"]);
    assert_eq!(
        store.count().await.unwrap().get(&SubjectStatus::Valid),
        Some(&5)
    );

    // A record gone behind the index's back (a process stopped between the
    // two writes) is left out of listing and sweeping, and the page still fills.
    let mut c = redis.connection().await;
    let gone = keys(&redis, "test:{pos:*:m-3}:subject").await;
    let _: () = redis::cmd("DEL")
        .arg(&gone)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(
        ids(store.list(None, Some("m-2"), 2).await.unwrap()),
        ["m-4", "m-5"],
        "an index entry without its record must be skipped"
    );
    assert_eq!(store.due(until(1_000), 10).await.unwrap(), ["m-2", "m-1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_process_at_a_time_holds_a_subjects_lease() {
    if !super::redis_installed() {
        return;
    }
    let redis = Redis::start(temp_dir("subjects-lease"));
    let (a, b) = (subjects(&redis), subjects(&redis));
    let ttl = Duration::from_secs(30);
    let held = a
        .try_lease("m-1", ttl)
        .await
        .unwrap()
        .expect("a free lease is granted");
    assert!(
        b.try_lease("m-1", ttl).await.unwrap().is_none(),
        "a held lease must not be granted twice"
    );
    assert!(
        b.try_lease("m-2", ttl).await.unwrap().is_some(),
        "another subject's lease is independent"
    );
    a.release("m-1", held).await.unwrap();
    let taken = b
        .try_lease("m-1", Duration::from_millis(200))
        .await
        .unwrap();
    assert!(taken.is_some(), "a released lease is free");

    // An expired lease is free; its former holder's late release does not
    // free the new holder's.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mine = loop {
        if let Some(l) = a.try_lease("m-1", ttl).await.unwrap() {
            break l;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the lease never expired"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    b.release("m-1", taken.unwrap()).await.unwrap();
    assert!(
        b.try_lease("m-1", ttl).await.unwrap().is_none(),
        "a late release must not free another holder's lease"
    );
    a.release("m-1", mine).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_time_entry_is_taken_once_across_processes() {
    if !super::redis_installed() {
        return;
    }
    let redis = Redis::start(temp_dir("subjects-once"));
    let (a, b) = (subjects(&redis), subjects(&redis));
    a.put_once("session-1", b"state", Duration::from_secs(60))
        .await
        .unwrap();
    let takes = (0..10).map(|i| {
        let s = if i % 2 == 0 { a.clone() } else { b.clone() };
        tokio::spawn(async move { s.take_once("session-1").await })
    });
    let mut taken = Vec::new();
    for t in takes {
        if let Some(v) = t.await.unwrap().unwrap() {
            taken.push(v);
        }
    }
    assert_eq!(
        taken,
        [b"state".to_vec()],
        "exactly one of ten takes must get the entry"
    );
    assert_eq!(a.take_once("session-1").await.unwrap(), None);

    b.put_once("session-2", b"state", Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(
        a.take_once("session-2").await.unwrap(),
        None,
        "expired at once"
    );
    let once = keys(&redis, "test:{pos:*}:once:*").await;
    assert!(
        once.is_empty(),
        "taken and expired entries leave no key: {once:?}"
    );
}

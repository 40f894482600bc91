//! The subjects' SQLite database: fencing, paging, sweeping order, one-time
//! entries, two processes on one file, damage, and 100,000 subjects.

use super::*;
use crate::secret::Secret;
use crate::store::{Backend, Store, SubjectLoad, SubjectRecord, SubjectStore, TokenState};

const KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "tokenproxy-subject-db-{name}-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A file store at `DIR/state.json` and the subjects of its client `pos`.
fn open(dir: &Path) -> (Store, SubjectStore) {
    let text = format!(
        r#"
[store]
kind = "file"
path = "{}"
key = "{KEY}"

[clients.pos]
listen = "127.0.0.1:0"
upstream = "http://127.0.0.1:1"

[clients.pos.token]
url = "https://auth.example/token"
client_id = "pos"
client_secret = "s3cret"
"#,
        dir.join("state.json").display()
    );
    let config = match crate::config::from_str(&text, None, &crate::config::MapEnv::new()) {
        Ok(c) => c,
        Err(e) => panic!("the test config should be valid: {e}"),
    };
    let store = Store::open(&config.store).expect("the file store opens");
    let subjects = store.subjects(&config.clients[0]);
    (store, subjects)
}

fn db_path(dir: &Path) -> PathBuf {
    dir.join("state.json.subjects.db")
}

fn meta(status: SubjectStatus, due_at_ms: Option<u64>) -> SubjectMeta {
    SubjectMeta {
        status,
        connected_at_ms: 1_700_000_000_000,
        access_expires_at_ms: Some(1_700_000_360_000),
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
            access_expires_at: meta_time(1_700_000_360_000),
            lifetime: Some(Duration::from_secs(360)),
            refresh_token: Some(Secret::new(format!("{access}-rt"))),
            refresh_expires_at: None,
            obtained_at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        },
        dpop_key: None,
    }
}

fn meta_time(ms: u64) -> Option<SystemTime> {
    Some(SystemTime::UNIX_EPOCH + Duration::from_millis(ms))
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

fn database(store: &Store) -> &SubjectDb {
    match &*store.backend {
        Backend::File(f) => &f.subjects,
        _ => panic!("a file store"),
    }
}

/// Runs `sql` on the database as an operator's editor would.
fn edit(dir: &Path, sql: &str) {
    let conn = Connection::open(db_path(dir)).unwrap();
    conn.execute_batch(sql).unwrap();
}

#[tokio::test]
async fn writes_are_fenced_by_generation_and_the_database_is_made_on_first_use_only() {
    let dir = temp_dir("fence");
    let (_store, subjects) = open(&dir);
    assert!(
        !db_path(&dir).exists(),
        "opening the store must not create the subject database"
    );
    assert!(matches!(
        subjects.get("m-1").await,
        Ok(SubjectLoad::Missing)
    ));
    assert!(db_path(&dir).exists(), "first subject use creates it");

    assert_eq!(
        subjects.put("m-1", &valid(1, "a1")).await.unwrap(),
        Saved::Written
    );
    assert_eq!(
        subjects.put("m-1", &valid(1, "other")).await.unwrap(),
        Saved::Stale { generation: 1 },
        "the same generation again must be refused"
    );
    assert_eq!(
        subjects.put("m-1", &valid(3, "a3")).await.unwrap(),
        Saved::Written
    );
    assert_eq!(
        subjects.put("m-1", &valid(2, "a2")).await.unwrap(),
        Saved::Stale { generation: 3 },
        "an older generation must not overwrite a newer one"
    );
    assert_eq!(found(&subjects, "m-1").await, valid(3, "a3"));
    assert!(subjects.delete("m-1").await.unwrap(), "there was one");
    assert!(!subjects.delete("m-1").await.unwrap(), "gone");
    assert!(matches!(
        subjects.get("m-1").await,
        Ok(SubjectLoad::Missing)
    ));

    let raw = std::fs::read(db_path(&dir)).unwrap();
    let wal = std::fs::read(dir.join("state.json.subjects.db-wal")).unwrap_or_default();
    for bytes in [&raw, &wal] {
        assert!(
            !String::from_utf8_lossy(bytes).contains("a3-rt"),
            "tokens must be stored sealed, never in clear"
        );
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        for name in ["state.json.subjects.db", "state.json.subjects.db-wal"] {
            let mode = std::fs::metadata(dir.join(name))
                .unwrap()
                .permissions()
                .mode()
                & 0o777;
            assert_eq!(mode, 0o600, "{name} should be private to tokenproxy's user");
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn list_pages_in_id_order_with_a_status_filter_and_a_cursor_and_count_by_status() {
    let dir = temp_dir("list");
    let (_store, subjects) = open(&dir);
    let dead = |g| record(g, "x", meta(SubjectStatus::NeedsAuthorization, None));
    for (id, r) in [
        ("m-5", valid(1, "a")),
        ("m-2", dead(1)),
        ("m-1", valid(1, "b")),
        ("m-4", dead(1)),
        ("m-3", valid(1, "c")),
    ] {
        assert_eq!(subjects.put(id, &r).await.unwrap(), Saved::Written);
    }
    let ids = |page: Vec<(String, SubjectMeta)>| -> Vec<String> {
        page.into_iter().map(|(s, _)| s).collect()
    };
    assert_eq!(
        ids(subjects.list(None, None, 2).await.unwrap()),
        ["m-1", "m-2"]
    );
    assert_eq!(
        ids(subjects.list(None, Some("m-2"), 2).await.unwrap()),
        ["m-3", "m-4"],
        "the next page starts strictly after the cursor"
    );
    assert_eq!(
        ids(subjects.list(None, Some("m-4"), 2).await.unwrap()),
        ["m-5"]
    );
    assert!(subjects
        .list(None, Some("m-5"), 2)
        .await
        .unwrap()
        .is_empty());
    let dead_page = subjects
        .list(Some(SubjectStatus::NeedsAuthorization), None, 10)
        .await
        .unwrap();
    assert_eq!(dead_page.len(), 2);
    assert!(dead_page
        .iter()
        .all(|(_, m)| m.status == SubjectStatus::NeedsAuthorization));
    assert_eq!(
        ids(subjects
            .list(Some(SubjectStatus::Valid), Some("m-1"), 1)
            .await
            .unwrap()),
        ["m-3"],
        "a filtered page skips the other status"
    );

    // A status change moves the subject between filters and counts.
    assert_eq!(
        subjects.put("m-2", &valid(2, "back")).await.unwrap(),
        Saved::Written
    );
    let counts = subjects.count().await.unwrap();
    assert_eq!(counts.get(&SubjectStatus::Valid), Some(&4), "{counts:?}");
    assert_eq!(
        counts.get(&SubjectStatus::NeedsAuthorization),
        Some(&1),
        "{counts:?}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn due_subjects_come_earliest_first_up_to_the_limit() {
    let dir = temp_dir("due");
    let (_store, subjects) = open(&dir);
    for (id, due) in [
        ("late", Some(5_000)),
        ("never", None),
        ("b-early", Some(1_000)),
        ("a-early", Some(1_000)),
        ("middle", Some(3_000)),
        ("future", Some(9_000)),
    ] {
        let r = record(1, id, meta(SubjectStatus::Valid, due));
        subjects.put(id, &r).await.unwrap();
    }
    let until = |ms| SystemTime::UNIX_EPOCH + Duration::from_millis(ms);
    assert_eq!(
        subjects.due(until(5_000), 10).await.unwrap(),
        ["a-early", "b-early", "middle", "late"],
        "due at or before the time, earliest first, ties by id"
    );
    assert_eq!(
        subjects.due(until(5_000), 2).await.unwrap(),
        ["a-early", "b-early"]
    );
    assert!(subjects.due(until(999), 10).await.unwrap().is_empty());
    // Rescheduled: the index follows the record.
    let r = record(2, "late", meta(SubjectStatus::Valid, Some(500)));
    subjects.put("late", &r).await.unwrap();
    assert_eq!(subjects.due(until(999), 10).await.unwrap(), ["late"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn a_one_time_entry_is_taken_once_and_never_after_it_expired() {
    let dir = temp_dir("once");
    let (_store, subjects) = open(&dir);
    let ttl = Duration::from_secs(600);
    subjects
        .put_once("session-1", b"state-1", ttl)
        .await
        .unwrap();
    assert_eq!(
        subjects.take_once("session-1").await.unwrap().as_deref(),
        Some(&b"state-1"[..])
    );
    assert_eq!(
        subjects.take_once("session-1").await.unwrap(),
        None,
        "a one-time entry must not be taken twice"
    );
    subjects
        .put_once("session-2", b"state-2", Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(
        subjects.take_once("session-2").await.unwrap(),
        None,
        "an expired entry must not be taken"
    );
    assert_eq!(subjects.take_once("never-made").await.unwrap(), None);
    let raw = std::fs::read(db_path(&dir)).unwrap();
    let wal = std::fs::read(dir.join("state.json.subjects.db-wal")).unwrap_or_default();
    assert!(
        !String::from_utf8_lossy(&raw).contains("state-1")
            && !String::from_utf8_lossy(&wal).contains("state-1"),
        "one-time entries are sealed"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A `tokenproxy subjects ...` command beside a running sidecar: two
/// stores on one file see each other's writes, and fencing holds across them.
#[tokio::test]
async fn two_stores_on_one_file_see_each_others_writes() {
    let dir = temp_dir("two");
    let (_sidecar_store, sidecar) = open(&dir);
    let (_cli_store, cli) = open(&dir);
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
    assert_eq!(
        cli.put("m-1", &valid(2, "late import")).await.unwrap(),
        Saved::Stale { generation: 2 },
        "the other store's newer write fences this one"
    );
    assert_eq!(found(&cli, "m-1").await, valid(2, "refreshed"));
    cli.put_once("s", b"v", Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(
        sidecar.take_once("s").await.unwrap().as_deref(),
        Some(&b"v"[..])
    );
    assert_eq!(
        cli.take_once("s").await.unwrap(),
        None,
        "taken by the other store"
    );

    // Writes from both at once: each waits for the other, none is lost.
    let writes = (0..20).map(|i| {
        let s = if i % 2 == 0 {
            sidecar.clone()
        } else {
            cli.clone()
        };
        tokio::spawn(async move { s.put(&format!("c-{i:02}"), &valid(1, "t")).await })
    });
    for w in writes {
        assert_eq!(w.await.unwrap().unwrap(), Saved::Written);
    }
    let listed = cli.list(None, Some("c-"), 100).await.unwrap();
    let written = listed.iter().filter(|(s, _)| s.starts_with("c-")).count();
    assert_eq!(written, 20, "every write of both stores should be kept");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn a_damaged_or_foreign_database_is_a_clear_error_and_left_as_it_is() {
    let dir = temp_dir("damaged");
    let garbage = b"this is not a database, just some text that happens to be here.".repeat(100);
    std::fs::write(db_path(&dir), &garbage).unwrap();
    let (_store, subjects) = open(&dir);
    let err = subjects
        .get("m-1")
        .await
        .expect_err("a damaged database is an error");
    let text = err.to_string();
    assert!(
        text.contains(&db_path(&dir).display().to_string())
            && text.contains("not an SQLite database"),
        "the error should name the file and say what is wrong: {text}"
    );
    assert_eq!(
        std::fs::read(db_path(&dir)).unwrap(),
        garbage,
        "left as it is"
    );

    let other = temp_dir("foreign");
    edit(&other, "CREATE TABLE accounts (id INTEGER);");
    let (_store, subjects) = open(&other);
    let text = subjects
        .put("m-1", &valid(1, "a"))
        .await
        .unwrap_err()
        .to_string();
    assert!(text.contains("another program"), "{text}");

    let newer = temp_dir("newer");
    edit(&newer, "PRAGMA user_version = 7;");
    let (_store, subjects) = open(&newer);
    let text = subjects.count().await.unwrap_err().to_string();
    assert!(text.contains("schema version 7"), "{text}");
    for d in [dir, other, newer] {
        std::fs::remove_dir_all(&d).unwrap();
    }
}

/// Rows edited by hand are records that do not open, never a failing
/// store or a panic; listing leaves them out; a write replaces them.
#[tokio::test]
async fn a_damaged_row_does_not_open_and_a_write_replaces_it() {
    let dir = temp_dir("row");
    let (_store, subjects) = open(&dir);
    for id in ["gen", "big", "blob", "meta", "fine"] {
        subjects.put(id, &valid(4, id)).await.unwrap();
    }
    let big = "x".repeat(MAX_RECORD_BYTES + 1);
    edit(
        &dir,
        &format!(
            "UPDATE subjects SET generation = 'abc' WHERE subject = 'gen';
             UPDATE subjects SET data = '{big}' WHERE subject = 'big';
             UPDATE subjects SET data = x'00ff' WHERE subject = 'blob';
             UPDATE subjects SET meta = '{{' WHERE subject = 'meta';"
        ),
    );
    for (id, problem) in [
        ("gen", "not a whole number"),
        ("big", "bytes, above"),
        ("blob", "not text"),
        ("meta", "clear part"),
    ] {
        match subjects.get(id).await {
            Ok(SubjectLoad::NotOpened { problem: p, .. }) => {
                assert!(p.contains(problem), "{id}: {p}")
            }
            other => panic!("{id} should not open, got {other:?}"),
        }
    }
    let listed: Vec<String> = subjects
        .list(None, None, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(
        listed,
        ["big", "blob", "fine", "gen"],
        "a clear part that does not parse is left out"
    );
    assert_eq!(
        subjects.put("gen", &valid(1, "new")).await.unwrap(),
        Saved::Written,
        "a generation that is not a number fences nothing"
    );
    assert_eq!(found(&subjects, "gen").await, valid(1, "new"));
    assert_eq!(
        subjects.put("big", &valid(5, "new")).await.unwrap(),
        Saved::Written
    );
    assert_eq!(found(&subjects, "big").await, valid(5, "new"));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Issue 16: start-up does not load every subject; with 100,000 stored,
/// opening the store and reading one subject takes milliseconds.
#[tokio::test]
async fn opening_a_store_of_100_000_subjects_and_reading_one_is_fast() {
    const N: usize = 100_000;
    let dir = temp_dir("many");
    {
        let (store, subjects) = open(&dir);
        subjects.put("wanted", &valid(1, "w")).await.unwrap();
        let key = subjects.key.to_string();
        let meta = serde_json::to_string(&meta(SubjectStatus::Valid, Some(5_000))).unwrap();
        database(&store)
            .with(move |conn| {
                let tx = conn.transaction()?;
                {
                    let mut insert = tx.prepare(
                        "INSERT INTO subjects (client, subject, generation, status, due_at_ms, meta, data)
                         VALUES (?1, ?2, 1, 'valid', ?3, ?4, 'sealed')",
                    )?;
                    for i in 0..N {
                        insert.execute(params![key, format!("m-{i:06}"), i as i64, meta])?;
                    }
                }
                tx.commit()
            })
            .await
            .unwrap();
    }
    let started = tokio::time::Instant::now();
    let (_store, subjects) = open(&dir);
    assert_eq!(found(&subjects, "wanted").await, valid(1, "w"));
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_secs(2),
        "open and first read took {elapsed:?} with {N} subjects stored; they must not be loaded"
    );
    assert_eq!(
        subjects.list(None, Some("m-049999"), 1).await.unwrap()[0].0,
        "m-050000"
    );
    assert_eq!(
        subjects
            .due(SystemTime::UNIX_EPOCH + Duration::from_millis(1), 3)
            .await
            .unwrap(),
        ["m-000000", "m-000001"]
    );
    let counts = subjects.count().await.unwrap();
    assert_eq!(counts.get(&SubjectStatus::Valid), Some(&(N as u64 + 1)));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn a_subject_s_dpop_key_is_sealed_in_its_record_and_deleted_with_it() {
    let dir = temp_dir("dpop-key");
    let (_store, subjects) = open(&dir);
    let mut r = valid(1, "a1");
    r.dpop_key = Some(crate::store::SubjectKey {
        alg: "ES256".to_owned(),
        pkcs8: Secret::new("c3ViamVjdC1rZXktbWF0ZXJpYWw="),
    });
    assert_eq!(subjects.put("m-1", &r).await.unwrap(), Saved::Written);
    let back = found(&subjects, "m-1").await;
    assert_eq!(
        back.dpop_key, r.dpop_key,
        "the key comes back with the tokens"
    );
    let raw = std::fs::read(db_path(&dir)).unwrap();
    let needle = b"c3ViamVjdC1rZXktbWF0ZXJpYWw";
    assert!(
        !raw.windows(needle.len()).any(|w| w == needle),
        "the key is sealed, never in clear in the database"
    );
    // A record of a subject without [dpop] has none.
    subjects.put("m-2", &valid(1, "b1")).await.unwrap();
    assert_eq!(found(&subjects, "m-2").await.dpop_key, None);
    assert!(subjects.delete("m-1").await.unwrap());
    assert!(matches!(
        subjects.get("m-1").await,
        Ok(SubjectLoad::Missing)
    ));
    std::fs::remove_dir_all(&dir).unwrap();
}

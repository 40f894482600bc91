//! `kind = "file"`: subjects and one-time entries in an SQLite database
//! beside the state file, named `PATH.subjects.db` (`state.json.subjects.db`
//! for `path = "state.json"`). Client records stay in the state file.
//!
//! Why SQLite: a JSON file rewritten whole does not hold 100,000 subjects,
//! and in write-ahead-log mode a `tokenproxy subjects ...` command and the
//! running sidecar use the same file at once (readers never wait for the
//! writer; writers wait up to [`BUSY_TIMEOUT`] for each other). Every write is
//! one transaction with `synchronous = FULL`: a rotated refresh token, once
//! reported stored, survives a crash or a power cut.
//!
//! The database is opened on first subject use (a store without subjects
//! never creates it), created with mode 0600 and never through a symbolic
//! link, in the directory `file.rs` has checked. One connection per process,
//! behind a mutex; every call runs on the blocking pool.
//!
//! Schema (version 1, in `PRAGMA user_version`): `subjects(client, subject,
//! generation, status, due_at_ms, meta, data)` keyed by `(client, subject)`,
//! `client` being `CLIENT:IDENTITY`; `status` and `due_at_ms` are copies of the
//! clear part `meta` (the truth, bound into the seal) for the indexes behind
//! listing and sweeping. `once(client, id, data, expires_at_ms)`. A database
//! of a newer schema, or a file that is not one of ours, is an error naming
//! the file and is left as it is.
//!
//! A row that does not parse (edited by hand) is read as a record that does
//! not open, never as the store failing; a write replaces it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use rusqlite::types::Value;
use rusqlite::{
    params, Connection, ErrorCode, OpenFlags, OptionalExtension, Transaction, TransactionBehavior,
};

use super::private_file::{open_error, private_options};
use super::subjects::SubjectEnvelope;
use super::{
    to_ms, Saved, StoreError, SubjectMeta, SubjectStatus, MAX_GENERATION, MAX_RECORD_BYTES,
};

/// The schema this version reads and writes.
const SCHEMA_VERSION: i64 = 1;

/// How long a write waits for another process's write to finish.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

const SCHEMA: &str = "
CREATE TABLE subjects (
    client TEXT NOT NULL,
    subject TEXT NOT NULL,
    generation INTEGER NOT NULL,
    status TEXT NOT NULL,
    due_at_ms INTEGER,
    meta TEXT NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (client, subject)
);
CREATE INDEX subjects_due ON subjects (client, due_at_ms, subject);
CREATE INDEX subjects_status ON subjects (client, status, subject);
CREATE TABLE once (
    client TEXT NOT NULL,
    id TEXT NOT NULL,
    data TEXT NOT NULL,
    expires_at_ms INTEGER NOT NULL,
    PRIMARY KEY (client, id)
);
";

/// A unit of work for the database thread.
type Job = Box<dyn FnOnce(&mut Option<Connection>) + Send>;

/// The subjects' database of one state file. One thread of its own owns the
/// connection and runs every statement in turn: no pool of blocking threads
/// grows with the number of subjects refreshed at once, and the connection is
/// never shared.
pub(crate) struct SubjectDb {
    path: PathBuf,
    /// The database thread's queue; started at first use (a store without
    /// subjects never opens the database), again if it ever died.
    jobs: Mutex<Option<std::sync::mpsc::Sender<Job>>>,
}

impl SubjectDb {
    /// The database beside the state file `state` (not opened yet).
    pub(crate) fn beside(state: &Path) -> SubjectDb {
        let mut path = state.as_os_str().to_owned();
        path.push(".subjects.db");
        SubjectDb {
            path: PathBuf::from(path),
            jobs: Mutex::new(None),
        }
    }

    /// Runs `op` on the connection on the database thread, opening the database first if needed.
    async fn with<T: Send + 'static>(
        &self,
        op: impl FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let path = self.path.clone();
        let job: Job = Box::new(move |slot: &mut Option<Connection>| {
            let result = (|| {
                let conn = match slot {
                    Some(conn) => conn,
                    empty => empty.insert(open(&path)?),
                };
                op(conn).map_err(|e| sql_error(&path, &e))
            })();
            let _caller_gone = reply.send(result);
        });
        self.submit(job)?;
        answer.await.map_err(|_| {
            StoreError::Io(format!(
                "subject database {}: its thread stopped",
                self.path.display()
            ))
        })?
    }

    fn submit(&self, job: Job) -> Result<(), StoreError> {
        let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        let job = match jobs.as_ref() {
            Some(tx) => match tx.send(job) {
                Ok(()) => return Ok(()),
                // The thread died (a panic in a statement): start a new one.
                Err(std::sync::mpsc::SendError(job)) => job,
            },
            None => job,
        };
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("tokenproxy-sqlite".to_owned())
            .spawn(move || {
                let mut conn = None;
                // Ends when the store (the sender) is dropped.
                while let Ok(job) = rx.recv() {
                    job(&mut conn);
                }
            })
            .map_err(|e| {
                StoreError::Io(format!("cannot start the subject database thread: {e}"))
            })?;
        tx.send(job).map_err(|_| {
            StoreError::Io("the subject database thread stopped at once".to_owned())
        })?;
        *jobs = Some(tx);
        Ok(())
    }
}

/// Opens (creating if needed) and checks the database at `path`.
fn open(path: &Path) -> Result<Connection, StoreError> {
    // Created here rather than by SQLite: mode 0600 (SQLite gives its -wal and
    // -shm files the database's mode), and a symbolic link is not followed.
    let mut options = private_options();
    options.read(true).write(true).create(true);
    options.open(path).map_err(|e| open_error(path, e))?;
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX
        | OpenFlags::SQLITE_OPEN_NOFOLLOW;
    let conn = Connection::open_with_flags(path, flags).map_err(|e| sql_error(path, &e))?;
    prepare(&conn, path)?;
    Ok(conn)
}

/// Sets the connection up and creates the schema in a new database.
fn prepare(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    let sql = |e: rusqlite::Error| sql_error(path, &e);
    conn.busy_timeout(BUSY_TIMEOUT).map_err(sql)?;
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
        .map_err(sql)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Io(format!(
            "subject database {}: cannot use write-ahead logging (journal mode stays {mode}); put store.path on a local file system",
            path.display()
        )));
    }
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(sql)?;
    let version = |conn: &Connection| -> rusqlite::Result<i64> {
        conn.pragma_query_value(None, "user_version", |r| r.get(0))
    };
    if version(conn).map_err(sql)? == SCHEMA_VERSION {
        return Ok(());
    }
    // The write lock first: two processes creating the schema at once wait
    // for each other, and the second finds it made.
    let tx = Transaction::new_unchecked(conn, TransactionBehavior::Immediate).map_err(sql)?;
    match version(&tx).map_err(sql)? {
        SCHEMA_VERSION => return Ok(()),
        0 => {}
        other => {
            return Err(StoreError::Io(format!(
                "subject database {}: written by another version of tokenproxy (schema version {other}, this one reads {SCHEMA_VERSION}); not used, and left as it is",
                path.display()
            )))
        }
    }
    let tables: i64 = tx
        .query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))
        .map_err(sql)?;
    if tables > 0 {
        return Err(StoreError::Io(format!(
            "subject database {}: it is a database of another program (it holds tables, but no tokenproxy schema version); not used, and left as it is: move it away",
            path.display()
        )));
    }
    tx.execute_batch(SCHEMA).map_err(sql)?;
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)
        .map_err(sql)?;
    tx.commit().map_err(sql)
}

/// An SQLite error as a store error naming the database.
fn sql_error(path: &Path, e: &rusqlite::Error) -> StoreError {
    let path = path.display();
    match e.sqlite_error_code() {
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => StoreError::Unavailable(
            format!("subject database {path}: still busy with another process's write after {} s: {e}", BUSY_TIMEOUT.as_secs()),
        ),
        Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt) => StoreError::Io(format!(
            "subject database {path}: it is damaged or not an SQLite database ({e}); not used, and left as it is: restore it from a backup, or move it away to start without subjects"
        )),
        _ => StoreError::Io(format!("subject database {path}: {e}")),
    }
}

fn to_sql_int(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The generation a stored value fences: one that is not a whole number
/// (edited by hand) fences nothing, so that the next write replaces it.
fn fence(stored: &Value) -> u64 {
    match stored {
        Value::Integer(g) => u64::try_from(*g).unwrap_or(0),
        _ => 0,
    }
}

/// One row as read; see [`SubjectEnvelope::refused`].
fn envelope(generation: Value, size: i64, meta: Value, data: Value) -> SubjectEnvelope {
    let Value::Integer(g) = generation else {
        return SubjectEnvelope::refused(0, "its generation is not a whole number".to_owned());
    };
    let Ok(g) = u64::try_from(g) else {
        return SubjectEnvelope::refused(0, format!("its generation {g} is negative"));
    };
    if g > MAX_GENERATION {
        return SubjectEnvelope::refused(
            g,
            format!("its generation {g} is above 2^53, which tokenproxy never writes"),
        );
    }
    if usize::try_from(size).map_or(true, |s| s > MAX_RECORD_BYTES) {
        return SubjectEnvelope::refused(
            g,
            format!("it is {size} bytes, above the {MAX_RECORD_BYTES} a record may have"),
        );
    }
    match (meta, data) {
        (Value::Text(meta), Value::Text(data)) => SubjectEnvelope {
            generation: g,
            meta,
            data,
            refused: None,
        },
        _ => SubjectEnvelope::refused(g, "its meta or data field is not text".to_owned()),
    }
}

/// A clear part as read for listing: none when it is not text, too big, or
/// not a subject's state.
fn meta_of(meta: Value) -> Option<SubjectMeta> {
    match meta {
        Value::Text(m) if m.len() <= MAX_RECORD_BYTES => serde_json::from_str(&m).ok(),
        _ => None,
    }
}

impl SubjectDb {
    pub(crate) async fn subject_get(
        &self,
        key: &str,
        subject: &str,
    ) -> Result<Option<SubjectEnvelope>, StoreError> {
        let (key, subject) = (key.to_owned(), subject.to_owned());
        self.with(move |conn| {
            conn.query_row(
                "SELECT g, size,
                        CASE WHEN size <= ?3 THEN meta END,
                        CASE WHEN size <= ?3 THEN data END
                     FROM (SELECT generation AS g, meta, data,
                             ifnull(length(CAST(meta AS BLOB)), 0)
                               + ifnull(length(CAST(data AS BLOB)), 0) AS size
                           FROM subjects WHERE client = ?1 AND subject = ?2)",
                params![key, subject, to_sql_int(MAX_RECORD_BYTES as u64)],
                |r| {
                    let size: Option<i64> = r.get(1)?;
                    Ok(envelope(r.get(0)?, size.unwrap_or(0), r.get(2)?, r.get(3)?))
                },
            )
            .optional()
        })
        .await
    }

    pub(crate) async fn subject_put(
        &self,
        key: &str,
        subject: &str,
        envelope: SubjectEnvelope,
        existing_only: bool,
    ) -> Result<Saved, StoreError> {
        let meta: SubjectMeta = serde_json::from_str(&envelope.meta).map_err(|e| {
            StoreError::Io(format!(
                "subject record to write has no valid clear part: {e}"
            ))
        })?;
        let (key, subject) = (key.to_owned(), subject.to_owned());
        let status = meta.status.as_str();
        let due = meta.due_at_ms.map(to_sql_int);
        self.with(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let held: Option<Value> = tx
                .query_row(
                    "SELECT generation FROM subjects WHERE client = ?1 AND subject = ?2",
                    params![key, subject],
                    |r| r.get(0),
                )
                .optional()?;
            match held.as_ref().map(fence) {
                Some(held) if held >= envelope.generation => {
                    return Ok(Saved::Stale { generation: held });
                }
                // Deleted meanwhile: it stays deleted.
                None if existing_only => return Ok(Saved::Stale { generation: 0 }),
                _ => {}
            }
            tx.execute(
                "INSERT INTO subjects (client, subject, generation, status, due_at_ms, meta, data)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                     ON CONFLICT (client, subject) DO UPDATE SET
                       generation = excluded.generation, status = excluded.status,
                       due_at_ms = excluded.due_at_ms, meta = excluded.meta, data = excluded.data",
                params![
                    key,
                    subject,
                    to_sql_int(envelope.generation),
                    status,
                    due,
                    envelope.meta,
                    envelope.data
                ],
            )?;
            tx.commit()?;
            Ok(Saved::Written)
        })
        .await
    }

    pub(crate) async fn subject_delete(
        &self,
        key: &str,
        subject: &str,
    ) -> Result<bool, StoreError> {
        let (key, subject) = (key.to_owned(), subject.to_owned());
        self.with(move |conn| {
            let n = conn.execute(
                "DELETE FROM subjects WHERE client = ?1 AND subject = ?2",
                params![key, subject],
            )?;
            Ok(n > 0)
        })
        .await
    }

    pub(crate) async fn subject_list(
        &self,
        key: &str,
        status: Option<SubjectStatus>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, SubjectMeta)>, StoreError> {
        let (key, after) = (key.to_owned(), after.unwrap_or_default().to_owned());
        let max = to_sql_int(MAX_RECORD_BYTES as u64);
        self.with(move |conn| {
            let mut out = Vec::new();
            if limit == 0 {
                return Ok(out);
            }
            // Rows are stepped lazily: a row left out (its clear part does
            // not parse) does not shorten the page.
            let meta = "CASE WHEN length(CAST(meta AS BLOB)) <= ?3 THEN meta END";
            let mut stmt;
            let mut rows = match status {
                Some(s) => {
                    stmt = conn.prepare(&format!(
                        "SELECT subject, {meta} FROM subjects
                             WHERE client = ?1 AND subject > ?2 AND status = ?4 ORDER BY subject"
                    ))?;
                    stmt.query(params![key, after, max, s.as_str()])?
                }
                None => {
                    stmt = conn.prepare(&format!(
                        "SELECT subject, {meta} FROM subjects
                             WHERE client = ?1 AND subject > ?2 ORDER BY subject"
                    ))?;
                    stmt.query(params![key, after, max])?
                }
            };
            while let Some(row) = rows.next()? {
                let (Value::Text(subject), Some(meta)) = (row.get(0)?, meta_of(row.get(1)?)) else {
                    continue;
                };
                if status.is_none_or(|s| meta.status == s) {
                    out.push((subject, meta));
                    if out.len() >= limit {
                        break;
                    }
                }
            }
            Ok(out)
        })
        .await
    }

    pub(crate) async fn subject_due(
        &self,
        key: &str,
        until_ms: u64,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        let key = key.to_owned();
        self.with(move |conn| {
            let mut stmt = conn.prepare(
                "SELECT subject FROM subjects WHERE client = ?1 AND due_at_ms <= ?2
                     ORDER BY due_at_ms, subject LIMIT ?3",
            )?;
            let rows = stmt.query_map(
                params![key, to_sql_int(until_ms), to_sql_int(limit as u64)],
                |r| r.get::<_, Value>(0),
            )?;
            let mut out = Vec::new();
            for row in rows {
                if let Value::Text(subject) = row? {
                    out.push(subject);
                }
            }
            Ok(out)
        })
        .await
    }

    pub(crate) async fn subject_count(
        &self,
        key: &str,
    ) -> Result<BTreeMap<SubjectStatus, u64>, StoreError> {
        let key = key.to_owned();
        self.with(move |conn| {
            let mut stmt = conn.prepare(
                "SELECT status, count(*) FROM subjects WHERE client = ?1 GROUP BY status",
            )?;
            let rows = stmt.query_map(params![key], |r| {
                Ok((r.get::<_, Value>(0)?, r.get::<_, i64>(1)?))
            })?;
            let mut counts = BTreeMap::new();
            for row in rows {
                let (status, n) = row?;
                let status = match &status {
                    Value::Text(s) => SubjectStatus::parse(s),
                    _ => None,
                };
                if let Some(status) = status {
                    *counts.entry(status).or_insert(0) += u64::try_from(n).unwrap_or(0);
                }
            }
            Ok(counts)
        })
        .await
    }

    pub(crate) async fn once_put(
        &self,
        key: &str,
        id: &str,
        data: String,
        expires_at_ms: u64,
    ) -> Result<(), StoreError> {
        let (key, id) = (key.to_owned(), id.to_owned());
        let now_ms = to_ms(SystemTime::now());
        self.with(move |conn| {
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                tx.execute(
                    "DELETE FROM once WHERE expires_at_ms <= ?1",
                    params![to_sql_int(now_ms)],
                )?;
                tx.execute(
                    "INSERT OR REPLACE INTO once (client, id, data, expires_at_ms) VALUES (?1, ?2, ?3, ?4)",
                    params![key, id, data, to_sql_int(expires_at_ms)],
                )?;
                tx.commit()
            })
            .await
    }

    pub(crate) async fn once_take(
        &self,
        key: &str,
        id: &str,
        now_ms: u64,
    ) -> Result<Option<String>, StoreError> {
        let (key, id) = (key.to_owned(), id.to_owned());
        self.with(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let taken: Option<(Value, Value)> = tx
                .query_row(
                    "DELETE FROM once WHERE client = ?1 AND id = ?2 RETURNING data, expires_at_ms",
                    params![key, id],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            tx.execute(
                "DELETE FROM once WHERE expires_at_ms <= ?1",
                params![to_sql_int(now_ms)],
            )?;
            tx.commit()?;
            Ok(match taken {
                Some((Value::Text(data), Value::Integer(expires)))
                    if expires > to_sql_int(now_ms) && data.len() <= MAX_RECORD_BYTES =>
                {
                    Some(data)
                }
                _ => None,
            })
        })
        .await
    }
}

#[cfg(test)]
mod tests;

//! File state: content digests (sha256), mode and owner of watched files.
//!
//! A change event only says that a file was touched; what it looks like
//! afterwards is read here, off the event path. Change digests run on at
//! most [`WORKERS`] blocking threads, one per path at a time; triggers for a
//! path already queued fold into one job, and a trigger for a path being
//! read queues one more read after it. A multi-gigabyte model file then
//! costs one background read per burst of changes and never delays events.
//!
//! Scans (the state of everything watched, when a policy is applied, and
//! the baseline scans the collector asks for) walk their tree on one
//! blocking thread each and report per file, then a [`Report::ScanDone`].

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashMap, HashSet, VecDeque},
    fs::Metadata,
    io::Read,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::Path,
    sync::{Arc, Mutex},
};

use serde::Serialize;
use sha2::{Digest as _, Sha256};
use tokio::{sync::mpsc, task::JoinSet};

use crate::{
    policy::ResourceKind,
    secrets::MaskKey,
    structure::{self, Content, Structure},
};

/// Change digests read at once.
pub const WORKERS: usize = 2;
/// Most files one worker takes at a time.
const BATCH: usize = 64;
/// Least time between the starts of two reads of one file: a file changed
/// without pause is read at most this often, the changes between folded
/// into the next read (a lone change is read at once).
const CADENCE: std::time::Duration = std::time::Duration::from_millis(100);
/// Files above this size are read after the others of their batch.
const LARGE: u64 = 8 << 20;
/// Most files one scan reports.
pub const SCAN_MAX_FILES: u64 = 200_000;
/// Deepest directory a scan enters.
const SCAN_MAX_DEPTH: usize = 32;
/// Reads of one file while it keeps changing under the reader.
const ATTEMPTS: usize = 3;
/// Cached digests kept before the cache starts over.
const CACHE_MAX: usize = 65_536;

/// Why a digest was taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// After a change event.
    Change,
    /// The path became watched (agent start, new policy).
    Watch,
    /// A baseline scan the collector asked for.
    Scan,
}

impl Reason {
    /// The API's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Change => "change",
            Reason::Watch => "watch",
            Reason::Scan => "scan",
        }
    }
}

fn octal<S: serde::Serializer>(mode: &u32, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{mode:04o}"))
}

/// The state of one file.
#[derive(Clone, Debug, Serialize)]
pub struct FileDigest {
    /// Absolute path.
    pub path: String,
    /// The policy resource it belongs to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
    /// False when the file is gone.
    pub exists: bool,
    /// SHA-256 of the content, hex (regular files; for a symlink, of its target text).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Size in bytes.
    pub size: u64,
    /// Permission bits.
    #[serde(serialize_with = "octal")]
    pub mode: u32,
    /// Owner uid.
    pub uid: u32,
    /// Owner gid.
    pub gid: u32,
    /// Modification time, Unix nanoseconds.
    pub mtime_unix_nanos: i64,
    /// Why it was taken.
    pub reason: Reason,
    /// The baseline scan it answers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scan_id: Option<String>,
    /// The event that triggered it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trigger_seq: Option<u64>,
    /// Why it could not be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// For a symlink, what it points to. Its digest, mode and owner are then
    /// those of the regular file it resolves to (what a reader of the name
    /// gets), or of its target text when it resolves to no regular file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub link_target: Option<String>,
    /// What the content says (config files, model headers), secrets masked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub structure: Option<Arc<Structure>>,
    /// Extended attributes and inode flags; `None` when they could not be
    /// read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attributes: Option<crate::attributes::Attributes>,
}

/// What the digester reports to the event loop.
#[derive(Debug)]
pub enum Report {
    /// One file's state.
    Digest(FileDigest),
    /// A scan finished.
    ScanDone {
        /// The scan (empty for a watch scan).
        scan_id: Option<String>,
        /// What was scanned.
        path: String,
        /// Files reported.
        files: u64,
        /// Files that could not be read.
        errors: u64,
        /// Why the scan failed as a whole.
        error: Option<String>,
    },
}

/// A request to read one file's state after a change.
#[derive(Clone, Debug)]
pub struct Job {
    /// Absolute path.
    pub path: String,
    /// Its resource.
    pub resource: Option<String>,
    /// Its resource's kind, which (with its name) decides what is
    /// summarised of its content, on the worker, off the event loop.
    pub kind: Option<ResourceKind>,
    /// The event that asked (the latest one when folded).
    pub trigger_seq: Option<u64>,
    /// False for chmod/chown: the content is known not to have changed, so
    /// a cached digest of the same inode, size and mtime may be reused.
    pub content_may_change: bool,
}

impl Job {
    /// Folds a later trigger for the same path into this one.
    fn fold(&mut self, later: Job) {
        self.trigger_seq = later.trigger_seq.or(self.trigger_seq);
        self.content_may_change |= later.content_may_change;
        if later.resource.is_some() {
            self.resource = later.resource;
            self.kind = later.kind;
        }
    }
}

/// The triggers of a run of events, one job per path, handed to the
/// digester together: under a stream of changes it then wakes once per
/// run, not once per event.
#[derive(Default)]
pub struct Batch {
    jobs: Vec<Job>,
    index: HashMap<String, usize>,
    /// Jobs added for the event being handled, whose sequence number
    /// [`Batch::triggered`] hands them.
    awaiting: Vec<usize>,
}

impl Batch {
    /// Adds a trigger for `path` and returns its job's place; the event's
    /// sequence number, once known, comes through [`Batch::triggered`].
    pub fn add(
        &mut self,
        path: &str,
        resource: &str,
        kind: ResourceKind,
        content_may_change: bool,
    ) -> usize {
        if let Some(&i) = self.index.get(path) {
            let job = &mut self.jobs[i];
            job.content_may_change |= content_may_change;
            if job.resource.as_deref() != Some(resource) {
                job.resource = Some(resource.to_owned());
                job.kind = Some(kind);
            }
            self.awaiting.push(i);
            return i;
        }
        self.awaiting.push(self.jobs.len());
        self.index.insert(path.to_owned(), self.jobs.len());
        self.jobs.push(Job {
            path: path.to_owned(),
            resource: Some(resource.to_owned()),
            kind: Some(kind),
            trigger_seq: None,
            content_may_change,
        });
        self.jobs.len() - 1
    }

    /// Hands the jobs added since the last call the event behind them (the
    /// latest one when folded; `None`: the event was not kept).
    pub fn triggered(&mut self, seq: Option<u64>) {
        if let Some(seq) = seq {
            for &i in &self.awaiting {
                if let Some(job) = self.jobs.get_mut(i) {
                    job.trigger_seq = Some(seq);
                }
            }
        }
        self.awaiting.clear();
    }

    /// True when no trigger waits.
    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }
}

/// Cached digests by file version. The strict key includes ctime, which
/// no caller can set, so a write that restores size and mtime still misses.
/// A file version's digest and, for the files summarised, its structure.
type Known = (String, Option<Arc<Structure>>);

#[derive(Default)]
struct Cache {
    strict: HashMap<(u64, u64, u64, i64, i64), Known>,
    loose: HashMap<(u64, u64, u64, i64), Known>,
}

impl Cache {
    fn get(&self, m: &Metadata, loose: bool) -> Option<Known> {
        if loose {
            self.loose.get(&loose_key(m)).cloned()
        } else {
            self.strict.get(&strict_key(m)).cloned()
        }
    }

    fn put(&mut self, m: &Metadata, known: &Known) {
        if self.strict.len() >= CACHE_MAX {
            self.strict.clear();
            self.loose.clear();
        }
        self.strict.insert(strict_key(m), known.clone());
        self.loose.insert(loose_key(m), known.clone());
    }
}

/// What the digest workers share: the cache of known versions and the
/// key masked values are salted with.
struct Shared {
    cache: Mutex<Cache>,
    attributes: Mutex<crate::attributes::Cache>,
    mask: Arc<MaskKey>,
}

fn mtime(m: &Metadata) -> i64 {
    m.mtime().saturating_mul(1_000_000_000) + m.mtime_nsec()
}

fn loose_key(m: &Metadata) -> (u64, u64, u64, i64) {
    (m.dev(), m.ino(), m.size(), mtime(m))
}

fn strict_key(m: &Metadata) -> (u64, u64, u64, i64, i64) {
    (
        m.dev(),
        m.ino(),
        m.size(),
        mtime(m),
        m.ctime().saturating_mul(1_000_000_000) + m.ctime_nsec(),
    )
}

fn hash_file(path: &Path) -> std::io::Result<String> {
    hash_reader(std::fs::File::open(path)?)
}

/// SHA-256 of everything `f` reads, hex.
pub fn hash_reader(mut f: impl Read) -> std::io::Result<String> {
    thread_local! {
        // One read buffer per worker thread, not a fresh megabyte per file.
        static BUF: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0u8; 1 << 20]);
    }
    let mut h = Sha256::new();
    BUF.with_borrow_mut(|buf| loop {
        match f.read(buf) {
            Ok(0) => return Ok(()),
            Ok(n) => h.update(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    })?;
    Ok(hex(&h.finalize()))
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// The digest of a regular file's content and what is summarised of it.
fn read_content(
    p: &Path,
    path: &str,
    content: Content,
    size: u64,
    mask: &MaskKey,
) -> std::io::Result<(String, Option<Structure>)> {
    match content {
        Content::Config if size <= structure::CONFIG_MAX => {
            // Small: read once, for the digest and the structure. Bounded,
            // should it grow meanwhile (the version check after the read
            // then reads it again).
            let mut bytes = Vec::with_capacity(size as usize + 1);
            std::fs::File::open(p)?
                .take(structure::CONFIG_MAX + 1)
                .read_to_end(&mut bytes)?;
            let sha = hex(&Sha256::digest(&bytes));
            let st = if bytes.len() as u64 > structure::CONFIG_MAX {
                Some(structure::too_large(mask))
            } else {
                structure::config(path, &bytes, mask)
            };
            Ok((sha, st))
        }
        Content::Config => Ok((hash_file(p)?, Some(structure::too_large(mask)))),
        Content::Model => {
            let sha = hash_file(p)?;
            let header = std::fs::File::open(p)
                .ok()
                .and_then(|f| structure::model(&f, mask));
            Ok((sha, header))
        }
        Content::Plain => Ok((hash_file(p)?, None)),
    }
}

/// Reads one file's state. `None` for what has no content state to
/// compare (directories, devices, sockets).
fn read_state(
    path: &str,
    resource: Option<String>,
    content: Content,
    reason: Reason,
    loose: bool,
    shared: &Shared,
) -> Option<FileDigest> {
    let mut d = FileDigest {
        path: path.to_owned(),
        resource,
        exists: false,
        sha256: None,
        size: 0,
        mode: 0,
        uid: 0,
        gid: 0,
        mtime_unix_nanos: 0,
        reason,
        scan_id: None,
        trigger_seq: None,
        error: None,
        link_target: None,
        structure: None,
        attributes: None,
    };
    let p = Path::new(path);
    for _ in 0..ATTEMPTS {
        // The state of a symlink that resolves to a file is that file's.
        let mut follow = false;
        let first = match std::fs::symlink_metadata(p) {
            Ok(m) if m.file_type().is_symlink() => {
                d.link_target = std::fs::read_link(p).ok().map(|t| t.display().to_string());
                match std::fs::metadata(p) {
                    Ok(t) if t.is_file() => {
                        follow = true;
                        Ok(t)
                    }
                    _ => Ok(m),
                }
            }
            other => other,
        };
        let stat = |p: &Path| {
            if follow {
                std::fs::metadata(p)
            } else {
                std::fs::symlink_metadata(p)
            }
        };
        let before = match first {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                d.exists = false;
                return Some(d);
            }
            Err(e) => {
                d.exists = true;
                d.error = Some(e.to_string());
                return Some(d);
            }
        };
        d.exists = true;
        d.size = before.size();
        d.mode = before.permissions().mode() & 0o7777;
        d.uid = before.uid();
        d.gid = before.gid();
        d.mtime_unix_nanos = mtime(&before);
        let ft = before.file_type();
        if ft.is_symlink() || ft.is_file() {
            let target = follow.then(|| std::fs::canonicalize(p).ok()).flatten();
            let of = target.as_deref().unwrap_or(p);
            let read = shared
                .attributes
                .lock()
                .map_err(|_| std::io::Error::other("attribute cache poisoned"))
                .and_then(|mut c| c.read(of, &before, &shared.mask));
            d.attributes = match read {
                Ok(a) => Some(a),
                Err(e) => {
                    tracing::debug!(path, "attributes not read: {e}");
                    None
                }
            };
        }
        if ft.is_symlink() {
            d.sha256 = std::fs::read_link(p)
                .ok()
                .map(|t| hex(&Sha256::digest(t.as_os_str().as_encoded_bytes())));
            return Some(d);
        }
        if !ft.is_file() {
            return None;
        }
        let cached = shared.cache.lock().ok().and_then(|c| c.get(&before, loose));
        if let Some((sha, structure)) = cached {
            d.sha256 = Some(sha);
            d.structure = structure;
            return Some(d);
        }
        match read_content(p, path, content, before.size(), &shared.mask) {
            Ok((sha, structure)) => {
                // Changed while being read: read again.
                match stat(p) {
                    Ok(after) if strict_key(&after) == strict_key(&before) => {
                        let known = (sha, structure.map(Arc::new));
                        if let Ok(mut c) = shared.cache.lock() {
                            c.put(&before, &known);
                        }
                        (d.sha256, d.structure) = (Some(known.0), known.1);
                        d.error = None;
                        return Some(d);
                    }
                    _ => d.error = Some("the file kept changing while it was read".into()),
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // Gone between the stat and the open: report it gone.
                continue;
            }
            Err(e) => {
                d.error = Some(e.to_string());
                return Some(d);
            }
        }
    }
    Some(d)
}

/// What a digest found, as compared with the one reported before it:
/// existence, content, mode, owner and attributes.
type Seen = (
    bool,
    Option<String>,
    u32,
    u32,
    u32,
    Option<crate::attributes::Attributes>,
);

/// The change digester and the scans.
#[derive(Clone)]
pub struct Digester {
    jobs: mpsc::UnboundedSender<Vec<Job>>,
    out: mpsc::UnboundedSender<Report>,
    shared: Arc<Shared>,
}

impl Digester {
    /// Starts the worker task; reports arrive on the returned receiver.
    /// Secrets in the structures of config files are masked with `mask`.
    pub fn start(mask: Arc<MaskKey>) -> (Self, mpsc::UnboundedReceiver<Report>) {
        let (jobs, rx) = mpsc::unbounded_channel();
        let (out, reports) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            cache: Mutex::new(Cache::default()),
            attributes: Mutex::new(crate::attributes::Cache::default()),
            mask,
        });
        tokio::spawn(run(rx, out.clone(), shared.clone()));
        (Self { jobs, out, shared }, reports)
    }

    /// Reads `job.path` once the changes to it settle.
    pub fn submit(&self, job: Job) {
        let _ = self.jobs.send(vec![job]);
    }

    /// Hands over the triggers gathered in `batch`, leaving it empty.
    pub fn submit_batch(&self, batch: &mut Batch) {
        if batch.is_empty() {
            return;
        }
        batch.index.clear();
        batch.awaiting.clear();
        // Copied out, so the batch keeps its room for the next run.
        let _ = self.jobs.send(batch.jobs.drain(..).collect());
    }

    /// Reports every regular file under `root` (a file or a tree), then a
    /// [`Report::ScanDone`]. `resource_of` names each file's resource and
    /// what is summarised of it.
    pub fn scan(
        &self,
        root: String,
        reason: Reason,
        scan_id: Option<String>,
        resource_of: impl Fn(&str) -> (Option<String>, Content) + Send + 'static,
    ) {
        let out = self.out.clone();
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || {
            let (files, errors, error) = walk(&root, &mut |path| {
                let (resource, content) = resource_of(path);
                let Some(mut d) = read_state(path, resource, content, reason, false, &shared)
                else {
                    return true;
                };
                d.scan_id.clone_from(&scan_id);
                let failed = d.error.is_some();
                if out.send(Report::Digest(d)).is_err() {
                    return false;
                }
                !failed
            });
            let _ = out.send(Report::ScanDone {
                scan_id,
                path: root,
                files,
                errors,
                error,
            });
        });
    }
}

/// Walks `root` without following symlinks, calling `visit` for each
/// non-directory (false from `visit` counts an error). Returns files,
/// errors, and why the walk failed as a whole.
fn walk(root: &str, visit: &mut dyn FnMut(&str) -> bool) -> (u64, u64, Option<String>) {
    walk_bounded(root, SCAN_MAX_FILES as usize, visit)
}

/// [`walk`], stopping after `max` files (the third value then says so).
pub fn walk_bounded(
    root: &str,
    max: usize,
    visit: &mut dyn FnMut(&str) -> bool,
) -> (u64, u64, Option<String>) {
    let meta = match std::fs::symlink_metadata(root) {
        Ok(m) => m,
        Err(e) => return (0, 0, Some(format!("{root}: {e}"))),
    };
    let (mut files, mut errors) = (0u64, 0u64);
    if !meta.is_dir() {
        if visit(root) {
            files += 1;
        } else {
            errors += 1;
        }
        return (files, errors, None);
    }
    let mut dirs = vec![(root.trim_end_matches('/').to_owned(), 0usize)];
    while let Some((dir, depth)) = dirs.pop() {
        let entries = match std::fs::read_dir(if dir.is_empty() { "/" } else { &dir }) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(%dir, "scan: cannot list: {e}");
                errors += 1;
                continue;
            }
        };
        let mut names: Vec<_> = entries.filter_map(Result::ok).collect();
        names.sort_by_key(|e| e.file_name());
        for e in names {
            let Some(name) = e.file_name().to_str().map(str::to_owned) else {
                errors += 1;
                continue;
            };
            let path = format!("{dir}/{name}");
            let is_dir = e.file_type().map(|t| t.is_dir()).unwrap_or(false);
            if is_dir {
                if depth + 1 < SCAN_MAX_DEPTH {
                    dirs.push((path, depth + 1));
                }
                continue;
            }
            if files + errors >= max as u64 {
                return (files, errors, Some(format!("stopped after {max} files")));
            }
            if visit(&path) {
                files += 1;
            } else {
                errors += 1;
            }
        }
    }
    (files, errors, None)
}

async fn run(
    mut rx: mpsc::UnboundedReceiver<Vec<Job>>,
    out: mpsc::UnboundedSender<Report>,
    shared: Arc<Shared>,
) {
    let mut queue: VecDeque<String> = VecDeque::new();
    let mut queued: HashMap<String, Job> = HashMap::new();
    let mut busy: HashSet<String> = HashSet::new();
    let mut again: HashMap<String, Job> = HashMap::new();
    let mut tasks: JoinSet<Vec<(String, Option<FileDigest>)>> = JoinSet::new();
    // What was last reported per path: a read that finds the same state
    // again (a burst of changes folded into two reads) is not reported twice.
    let mut last: HashMap<String, Seen> = HashMap::new();
    let mut open = true;
    // When each path's last read started, and the paths whose next read
    // waits for CADENCE to pass since then (their jobs are in `queued`).
    let mut started: HashMap<String, tokio::time::Instant> = HashMap::new();
    let mut later: BinaryHeap<Reverse<(tokio::time::Instant, String)>> = BinaryHeap::new();
    loop {
        let now = tokio::time::Instant::now();
        while let Some(Reverse((due, _))) = later.peek() {
            if *due > now && open {
                break;
            }
            if let Some(Reverse((_, path))) = later.pop() {
                queue.push_back(path);
            }
        }
        while tasks.len() < WORKERS && !queue.is_empty() {
            // What is queued goes to a worker together: under a stream of
            // changes the workers wake once per batch, not once per file
            // (a blocking task per digest made thread switches most of
            // the agent's CPU). Large files go last in their batch, so a
            // model being read never holds up the small files beside it.
            let mut batch = Vec::new();
            while batch.len() < BATCH {
                let Some(path) = queue.pop_front() else { break };
                let Some(job) = queued.remove(&path) else {
                    continue;
                };
                if started.len() >= CACHE_MAX {
                    started.clear();
                }
                started.insert(path.clone(), now);
                busy.insert(path);
                batch.push(job);
            }
            if batch.is_empty() {
                break;
            }
            let shared = shared.clone();
            tasks.spawn_blocking(move || {
                batch.sort_by_cached_key(|job| {
                    std::fs::symlink_metadata(&job.path).is_ok_and(|m| m.len() > LARGE)
                });
                batch
                    .into_iter()
                    .map(|job| {
                        let content = Content::of(job.kind, &job.path);
                        let d = read_state(
                            &job.path,
                            job.resource,
                            content,
                            Reason::Change,
                            !job.content_may_change,
                            &shared,
                        )
                        .map(|mut d| {
                            d.trigger_seq = job.trigger_seq;
                            d
                        });
                        (job.path, d)
                    })
                    .collect()
            });
        }
        if !open && tasks.is_empty() && queue.is_empty() && later.is_empty() {
            return;
        }
        // A path read less than CADENCE ago waits for it: the changes that
        // arrive meanwhile fold into one read, and a file written without
        // pause is read at most 1 / CADENCE times a second (after the last
        // change it is always read once more).
        let next_due = later.peek().map(|Reverse((due, _))| *due);
        let mut enqueue = |path: String, queue: &mut VecDeque<String>| match started.get(&path) {
            Some(t) if *t + CADENCE > tokio::time::Instant::now() => {
                later.push(Reverse((*t + CADENCE, path)));
            }
            _ => queue.push_back(path),
        };
        tokio::select! {
            () = tokio::time::sleep_until(next_due.unwrap_or_else(tokio::time::Instant::now)), if next_due.is_some() => {}
            jobs = rx.recv(), if open => match jobs {
                Some(jobs) => {
                    for job in jobs {
                        if busy.contains(&job.path) {
                            match again.get_mut(&job.path) {
                                Some(q) => q.fold(job),
                                None => { again.insert(job.path.clone(), job); }
                            }
                        } else if let Some(q) = queued.get_mut(&job.path) {
                            q.fold(job);
                        } else {
                            let path = job.path.clone();
                            queued.insert(path.clone(), job);
                            enqueue(path, &mut queue);
                        }
                    }
                }
                None => open = false,
            },
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                let Ok(results) = done else {
                    tracing::error!("a digest worker failed");
                    continue;
                };
                for (path, d) in results {
                    busy.remove(&path);
                    if let Some(job) = again.remove(&path) {
                        queued.insert(path.clone(), job);
                        enqueue(path.clone(), &mut queue);
                    }
                    let Some(d) = d else { continue };
                    let seen = (
                        d.exists,
                        d.sha256.clone(),
                        d.mode,
                        d.uid,
                        d.gid,
                        d.attributes.clone(),
                    );
                    if d.error.is_none() && last.get(&path) == Some(&seen) {
                        continue;
                    }
                    if last.len() >= CACHE_MAX {
                        last.clear();
                    }
                    last.insert(path, seen);
                    if out.send(Report::Digest(d)).is_err() {
                        return;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_batch_holds_one_job_per_path_with_its_latest_trigger() {
        let mut batch = Batch::default();
        let a = batch.add("/etc/a", "app", ResourceKind::Config, false);
        batch.triggered(Some(1));
        batch.add("/etc/b", "app", ResourceKind::Config, true);
        batch.triggered(Some(2));
        let again = batch.add("/etc/a", "app", ResourceKind::Config, true);
        assert_eq!(again, a);
        batch.triggered(Some(3));
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (out, _reports) = mpsc::unbounded_channel();
        let digester = Digester {
            jobs: tx,
            out,
            shared: shared(),
        };
        digester.submit_batch(&mut batch);
        assert!(batch.is_empty());
        digester.submit_batch(&mut batch);
        let jobs = rx.recv().await.expect("one batch");
        assert!(rx.try_recv().is_err(), "an empty batch is not sent");
        let got: Vec<_> = jobs
            .iter()
            .map(|j| (j.path.as_str(), j.trigger_seq, j.content_may_change))
            .collect();
        assert_eq!(got, [("/etc/a", Some(3), true), ("/etc/b", Some(2), true)]);
        // Emptied, the batch starts over: a path seen before is new again.
        assert_eq!(batch.add("/etc/b", "app", ResourceKind::Config, false), 0);
    }

    #[tokio::test]
    async fn a_file_written_without_pause_is_read_once_per_cadence_and_after_its_last_change() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("busy.conf");
        let path = f.to_str().expect("utf-8").to_owned();
        let (digester, mut reports) = Digester::start(Arc::new(MaskKey::ephemeral()));
        let job = |seq| Job {
            path: path.clone(),
            resource: None,
            kind: None,
            trigger_seq: Some(seq),
            content_may_change: true,
        };
        let writing = std::time::Duration::from_millis(600);
        let start = std::time::Instant::now();
        let mut seq = 0;
        // Long enough in time and in changes, however busy the machine.
        while start.elapsed() < writing || seq < 200 {
            std::fs::write(&f, format!("v{seq}")).expect("write");
            digester.submit(job(seq));
            seq += 1;
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        let wrote_for = start.elapsed();
        std::fs::write(&f, "final").expect("write");
        digester.submit(job(seq));
        let want = "sha256 of final";
        let final_sha = {
            use sha2::Digest as _;
            hex(&sha2::Sha256::digest(b"final"))
        };
        let mut reads = 0;
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let r = tokio::time::timeout_at(deadline, reports.recv())
                .await
                .unwrap_or_else(|_| panic!("no digest with the {want} after {reads} reads"));
            let Some(Report::Digest(d)) = r else { continue };
            reads += 1;
            if d.sha256.as_deref() == Some(final_sha.as_str()) {
                assert_eq!(d.trigger_seq, Some(seq), "the last change's read names it");
                break;
            }
        }
        // Hundreds of changes, one read per CADENCE (100 ms) at most, and
        // the one after the last change.
        let most = (wrote_for.as_millis() / CADENCE.as_millis()) as usize + 3;
        assert!(
            reads <= most,
            "{reads} reads of {seq} changes (at most {most})"
        );
        assert!(
            reads as u64 * 10 <= seq,
            "{reads} reads of {seq} changes: not folded"
        );
    }

    fn shared() -> Arc<Shared> {
        Arc::new(Shared {
            cache: Mutex::new(Cache::default()),
            attributes: Mutex::new(crate::attributes::Cache::default()),
            mask: Arc::new(MaskKey::ephemeral()),
        })
    }

    fn state(path: &str, loose: bool, shared: &Shared) -> FileDigest {
        read_state(path, None, Content::Plain, Reason::Change, loose, shared).expect("a file")
    }

    #[test]
    fn a_config_file_is_read_once_for_its_digest_and_structure() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("app.yaml");
        std::fs::write(&f, b"replicas: 1\npassword: s3cret-OLD-7f3a\n").expect("write");
        let shared = shared();
        let p = f.to_str().expect("utf-8");
        let d =
            read_state(p, None, Content::Config, Reason::Change, false, &shared).expect("a file");
        let want = hex(&Sha256::digest(b"replicas: 1\npassword: s3cret-OLD-7f3a\n"));
        assert_eq!(d.sha256.as_deref(), Some(want.as_str()));
        let st = d.structure.expect("a structure");
        assert_eq!(st.format, "yaml");
        assert!(!format!("{st:?}").contains("s3cret"));
        // From the cache, the structure comes with the digest.
        let again =
            read_state(p, None, Content::Config, Reason::Change, true, &shared).expect("a file");
        assert_eq!(again.structure.as_deref(), Some(&*st));
        // Plain files have none.
        let d = state(p, false, &self::shared());
        assert!(d.structure.is_none());
    }

    #[test]
    fn digests_content_mode_and_absence() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("a.conf");
        std::fs::write(&f, b"abc").expect("write");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        let cache = shared();
        let p = f.to_str().expect("utf-8");
        let d = state(p, false, &cache);
        assert!(d.exists);
        assert_eq!(
            d.sha256.as_deref(),
            Some("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
        );
        assert_eq!((d.size, d.mode), (3, 0o640));
        std::fs::remove_file(&f).expect("rm");
        let d = state(p, false, &cache);
        assert!(!d.exists && d.sha256.is_none());
        assert!(read_state(
            dir.path().to_str().expect("utf-8"),
            None,
            Content::Plain,
            Reason::Change,
            false,
            &cache
        )
        .is_none());
    }

    #[test]
    fn same_size_and_mtime_rewrite_is_read_again() {
        // A content change that restores size and mtime must not be
        // answered from the cache: ctime gives it away.
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("m.bin");
        std::fs::write(&f, b"one").expect("write");
        let cache = shared();
        let p = f.to_str().expect("utf-8");
        let first = state(p, false, &cache).sha256;
        let mtime = std::fs::metadata(&f)
            .and_then(|m| m.modified())
            .expect("mtime");
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&f, b"two").expect("write");
        let file = std::fs::File::options().write(true).open(&f).expect("open");
        file.set_modified(mtime).expect("set mtime");
        let second = state(p, false, &cache).sha256;
        assert_ne!(first, second);
    }

    #[test]
    fn walk_reports_files_in_a_tree() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("a/b")).expect("mkdir");
        for f in ["x", "a/y", "a/b/z"] {
            std::fs::write(dir.path().join(f), f).expect("write");
        }
        let mut seen = Vec::new();
        let (files, errors, error) = walk(dir.path().to_str().expect("utf-8"), &mut |p| {
            seen.push(p.to_owned());
            true
        });
        assert_eq!((files, errors, error), (3, 0, None));
        assert!(seen.iter().any(|p| p.ends_with("/a/b/z")));
        let (_, _, error) = walk("/nonexistent/driftwatch", &mut |_| true);
        assert!(error.is_some());
    }
}

//! The manifest-directory source (`lb-agent --manifests DIR`).
//!
//! Owns reading a directory of `*.yaml`, `*.yml` and `*.json` files in the
//! shape `kubectl get -o yaml` prints (multi-document YAML, `kind: List`
//! wrappers), turning them into a [`ClusterState`], and watching the
//! directory for changes.
//!
//! Bad input never aborts a load: every problem becomes a [`SourceError`]
//! that names the file, the document and, when known, the object, and
//! everything else is still loaded.

use std::fmt;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::Deserialize;
use serde_yaml::Value;
use tokio::sync::watch;

use crate::model::ClusterState;
use crate::source::ClusterObject;

/// A problem with one file, document or object of the manifest directory.
///
/// Displays as `manifests/web.yaml document 2 (Service default/web): ...`;
/// documents are counted from 1, as an editor shows them.
#[derive(Debug, thiserror::Error)]
#[error("{}: {problem}", Location::of(.file, *.document, *.item, .object.as_deref()))]
pub struct SourceError {
    /// The file, or the directory itself when it cannot be listed.
    pub file: PathBuf,
    /// 1-based index of the YAML document within the file.
    pub document: Option<usize>,
    /// 0-based index within the `items` of a `kind: List` document.
    pub item: Option<usize>,
    /// `Kind namespace/name` (or `Kind name` for cluster-scoped kinds), as far
    /// as it could be read.
    pub object: Option<String>,
    #[source]
    pub problem: SourceProblem,
}

/// What went wrong; the [`SourceError`] says where.
#[derive(Debug, thiserror::Error)]
pub enum SourceProblem {
    #[error("cannot read: {0}")]
    Io(#[from] io::Error),
    /// Not YAML. A syntax error loses the rest of its file (the parser
    /// cannot resynchronise; earlier documents are kept); a duplicate key
    /// loses only its document.
    #[error("{0}")]
    Syntax(serde_yaml::Error),
    #[error("document is not an object")]
    NotAnObject,
    #[error("{0} is missing")]
    MissingField(&'static str),
    #[error("items is not a list")]
    ItemsNotAList,
    /// A known kind whose body does not match its schema; the message starts
    /// with the field's path when it is known.
    #[error("{0}")]
    Invalid(String),
}

struct Location<'a> {
    file: &'a Path,
    document: Option<usize>,
    item: Option<usize>,
    object: Option<&'a str>,
}

impl<'a> Location<'a> {
    fn of(
        file: &'a Path,
        document: Option<usize>,
        item: Option<usize>,
        object: Option<&'a str>,
    ) -> Self {
        Location {
            file,
            document,
            item,
            object,
        }
    }
}

impl fmt::Display for Location<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(document) = self.document {
            write!(f, " document {document}")?;
        }
        if let Some(item) = self.item {
            write!(f, " items[{item}]")?;
        }
        if let Some(object) = self.object {
            write!(f, " ({object})")?;
        }
        Ok(())
    }
}

/// Loads every manifest file of `dir` (non-recursive, by name order, hidden
/// files skipped). Later definitions of the same object replace earlier ones.
pub fn load_dir(dir: &Path) -> (ClusterState, Vec<SourceError>) {
    match read_manifests(dir) {
        Ok(files) => parse_manifests(files),
        Err(error) => (
            ClusterState::default(),
            vec![SourceError {
                file: dir.to_owned(),
                document: None,
                item: None,
                object: None,
                problem: SourceProblem::Io(error),
            }],
        ),
    }
}

/// One manifest file as read from disk: what the fingerprint covers and what
/// is parsed come from the same read, so a change between the two cannot be
/// missed.
struct ManifestFile {
    path: PathBuf,
    modified: Option<SystemTime>,
    contents: io::Result<Vec<u8>>,
}

fn is_manifest_name(name: &str) -> bool {
    if name.starts_with('.') {
        // Also skips the `..data` and `..<timestamp>` entries of ConfigMap
        // volumes; the visible names are symlinks into them.
        return false;
    }
    Path::new(name)
        .extension()
        .and_then(|extension| extension.to_str())
        .is_some_and(|extension| {
            ["yaml", "yml", "json"]
                .iter()
                .any(|known| extension.eq_ignore_ascii_case(known))
        })
}

/// Lists and reads the manifest files of `dir`. Only a failure to list the
/// directory is an error here; a file that cannot be read is carried along
/// and reported when parsed.
fn read_manifests(dir: &Path) -> io::Result<Vec<ManifestFile>> {
    let mut paths = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if is_manifest_name(&name) {
            paths.push(entry.path());
        }
    }
    paths.sort();

    let mut files = Vec::with_capacity(paths.len());
    for path in paths {
        // `metadata` follows symlinks, which ConfigMap volumes are made of.
        let metadata = match std::fs::metadata(&path) {
            Ok(metadata) => metadata,
            Err(error) => {
                files.push(ManifestFile {
                    path,
                    modified: None,
                    contents: Err(error),
                });
                continue;
            }
        };
        if !metadata.is_file() {
            continue;
        }
        let contents = std::fs::read(&path);
        files.push(ManifestFile {
            path,
            modified: metadata.modified().ok(),
            contents,
        });
    }
    Ok(files)
}

/// What the watcher compares between polls. The content hash catches edits
/// that keep the length and land within the mtime's granularity.
#[derive(Clone, Debug, PartialEq, Eq)]
struct FileFingerprint {
    path: PathBuf,
    len: Option<usize>,
    modified: Option<SystemTime>,
    content_hash: Option<u64>,
}

fn fingerprint(files: &[ManifestFile]) -> Vec<FileFingerprint> {
    files
        .iter()
        .map(|file| {
            let contents = file.contents.as_ref().ok();
            FileFingerprint {
                path: file.path.clone(),
                len: contents.map(Vec::len),
                modified: file.modified,
                content_hash: contents.map(|bytes| {
                    let mut hasher = DefaultHasher::new();
                    bytes.hash(&mut hasher);
                    hasher.finish()
                }),
            }
        })
        .collect()
}

fn parse_manifests(files: Vec<ManifestFile>) -> (ClusterState, Vec<SourceError>) {
    let mut state = ClusterState::default();
    let mut errors = Vec::new();
    for file in files {
        match file.contents {
            Ok(contents) => parse_file(&file.path, &contents, &mut state, &mut errors),
            Err(error) => errors.push(SourceError {
                file: file.path,
                document: None,
                item: None,
                object: None,
                problem: SourceProblem::Io(error),
            }),
        }
    }
    (state, errors)
}

/// Loads the documents of one manifest file, already read, into `state`;
/// `path` is only used to name the file in errors. Useful for manifests that
/// do not come from a directory (tests, fixtures).
pub fn parse_manifest(path: &Path, contents: &[u8], state: &mut ClusterState) -> Vec<SourceError> {
    let mut errors = Vec::new();
    parse_file(path, contents, state, &mut errors);
    errors
}

fn parse_file(
    path: &Path,
    contents: &[u8],
    state: &mut ClusterState,
    errors: &mut Vec<SourceError>,
) {
    // serde_yaml 0.9 panics on some malformed input ("unexpected end of
    // mapping", found by fuzzing): the file is then an error, not the end
    // of the agent. Documents before the panic stay loaded, as after a
    // syntax error.
    let parsed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        parse_documents(path, contents, state, errors)
    }));
    if let Err(panic) = parsed {
        let message = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        errors.push(SourceError {
            file: path.to_owned(),
            document: None,
            item: None,
            object: None,
            problem: SourceProblem::Invalid(format!(
                "the YAML parser gave up on this file: {message}"
            )),
        });
    }
}

fn parse_documents(
    path: &Path,
    contents: &[u8],
    state: &mut ClusterState,
    errors: &mut Vec<SourceError>,
) {
    let mut last_error = None;
    for (index, document) in serde_yaml::Deserializer::from_slice(contents).enumerate() {
        let mut place = Place {
            file: path,
            document: index + 1,
            item: None,
        };
        let value = match Value::deserialize(document) {
            Ok(value) => value,
            Err(error) => {
                // After a syntax error libyaml cannot resynchronise and hands
                // out the same error for every further "document": stop at
                // the repeat. Other errors (a duplicate key) spoil only their
                // own document, and the next one loads.
                let identity = (error.location().map(|at| at.index()), error.to_string());
                if last_error.as_ref() == Some(&identity) {
                    break;
                }
                last_error = Some(identity);
                errors.push(place.error(None, SourceProblem::Syntax(error)));
                continue;
            }
        };
        match value {
            // An empty document: `---` at the start or end of a file.
            Value::Null => {}
            Value::Mapping(_) => {
                if let Some(items) = list_items(&value) {
                    match items {
                        Some(items) => {
                            for (item, value) in items.iter().enumerate() {
                                place.item = Some(item);
                                load_object(&place, value, state, errors);
                            }
                        }
                        None => errors.push(
                            place.error(Some("List".to_owned()), SourceProblem::ItemsNotAList),
                        ),
                    }
                } else {
                    load_object(&place, &value, state, errors);
                }
            }
            _ => errors.push(place.error(None, SourceProblem::NotAnObject)),
        }
    }
}

/// Where in the directory an object was found.
struct Place<'a> {
    file: &'a Path,
    document: usize,
    item: Option<usize>,
}

impl Place<'_> {
    fn error(&self, object: Option<String>, problem: SourceProblem) -> SourceError {
        SourceError {
            file: self.file.to_owned(),
            document: Some(self.document),
            item: self.item,
            object,
            problem,
        }
    }
}

/// `Some(items)` when `value` is a `v1/List` (`kubectl get` of several
/// objects); `Some(None)` when it is one but `items` is not a sequence.
fn list_items(value: &Value) -> Option<Option<&[Value]>> {
    let is_list = value.get("apiVersion").and_then(Value::as_str) == Some("v1")
        && value.get("kind").and_then(Value::as_str) == Some("List");
    if !is_list {
        return None;
    }
    Some(match value.get("items") {
        None | Some(Value::Null) => Some(&[]),
        Some(Value::Sequence(items)) => Some(items.as_slice()),
        Some(_) => None,
    })
}

/// Dispatches one object on apiVersion/kind and stores it.
fn load_object(
    place: &Place<'_>,
    value: &Value,
    state: &mut ClusterState,
    errors: &mut Vec<SourceError>,
) {
    if !value.is_mapping() {
        errors.push(place.error(None, SourceProblem::NotAnObject));
        return;
    }
    let kind = value.get("kind").and_then(Value::as_str);
    let api_version = value.get("apiVersion").and_then(Value::as_str);
    let metadata = value.get("metadata");
    let name = metadata
        .and_then(|metadata| metadata.get("name"))
        .and_then(Value::as_str)
        .filter(|name| !name.is_empty());
    let namespace = metadata
        .and_then(|metadata| metadata.get("namespace"))
        .and_then(Value::as_str)
        .filter(|namespace| !namespace.is_empty());
    let describe = |kind: &str, namespaced: bool| -> String {
        match (namespaced, name) {
            (true, Some(name)) => format!("{kind} {}/{name}", namespace.unwrap_or("default")),
            (false, Some(name)) => format!("{kind} {name}"),
            (_, None) => kind.to_owned(),
        }
    };

    let Some(kind) = kind else {
        errors.push(place.error(None, SourceProblem::MissingField("kind")));
        return;
    };
    let Some(api_version) = api_version else {
        errors.push(place.error(
            Some(describe(kind, true)),
            SourceProblem::MissingField("apiVersion"),
        ));
        return;
    };
    let namespaced = kind != "Node";
    let object = match (api_version, kind) {
        ("v1", "Service") => deserialize::<Service>(value).map(ClusterObject::Service),
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            deserialize::<EndpointSlice>(value).map(ClusterObject::EndpointSlice)
        }
        ("v1", "Node") => deserialize::<Node>(value).map(ClusterObject::Node),
        _ => {
            log::debug!(
                "{}: ignoring {api_version} {kind}, not a kind the proxy reads",
                Location {
                    file: place.file,
                    document: Some(place.document),
                    item: place.item,
                    object: Some(&describe(kind, true)),
                }
            );
            return;
        }
    };
    let object = match object {
        Ok(object) => object,
        Err(problem) => {
            errors.push(place.error(Some(describe(kind, namespaced)), problem));
            return;
        }
    };
    if name.is_none() {
        errors.push(place.error(
            Some(kind.to_owned()),
            SourceProblem::MissingField("metadata.name"),
        ));
        return;
    }
    // The name was checked above, so the store accepts it.
    state.upsert(object);
}

fn deserialize<T: serde::de::DeserializeOwned>(value: &Value) -> Result<T, SourceProblem> {
    T::deserialize(value).map_err(|error| {
        SourceProblem::Invalid(field_path_message::<T>(value).unwrap_or_else(|| error.to_string()))
    })
}

/// Errors from deserializing a `Value` do not say which field failed; those
/// from text do (`spec.ports[1].port: invalid type: ...`). So, on the
/// (rare) failure path only, deserialize again from the object re-emitted as
/// text, and drop the line/column, which point into that re-emitted text.
fn field_path_message<T: serde::de::DeserializeOwned>(value: &Value) -> Option<String> {
    let text = serde_yaml::to_string(value).ok()?;
    let error = serde_yaml::from_str::<T>(&text).err()?;
    let message = error.to_string();
    let Some(location) = error.location() else {
        return Some(message);
    };
    let suffix = format!(" at line {} column {}", location.line(), location.column());
    Some(message.strip_suffix(&suffix).unwrap_or(&message).to_owned())
}

/// Polls a manifest directory and tells when its contents changed.
///
/// Polling is deliberate: inotify does not see files replaced behind a bind
/// mount, which is how ConfigMap volumes are updated.
pub struct DirWatcher {
    dir: PathBuf,
    last: Option<Vec<FileFingerprint>>,
    directory_missing: bool,
}

impl DirWatcher {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        DirWatcher {
            dir: dir.into(),
            last: None,
            directory_missing: false,
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Reads the directory and compares it with the last poll.
    ///
    /// When the directory cannot be listed, that is reported once
    /// ([`PollOutcome::Unreadable`]) and then [`PollOutcome::Unchanged`] until it can be
    /// read again: the last published state stays in force, since dropping
    /// every service because a volume is briefly missing would cut all
    /// traffic.
    pub fn poll(&mut self) -> PollOutcome {
        let files = match read_manifests(&self.dir) {
            Ok(files) => files,
            Err(error) => {
                if self.directory_missing {
                    return PollOutcome::Unchanged;
                }
                self.directory_missing = true;
                // Whatever appears once the directory is back is new.
                self.last = None;
                return PollOutcome::Unreadable(SourceError {
                    file: self.dir.clone(),
                    document: None,
                    item: None,
                    object: None,
                    problem: SourceProblem::Io(error),
                });
            }
        };
        self.directory_missing = false;
        let current = fingerprint(&files);
        if self.last.as_ref() == Some(&current) {
            return PollOutcome::Unchanged;
        }
        self.last = Some(current);
        let (state, errors) = parse_manifests(files);
        PollOutcome::Changed(state, errors)
    }
}

/// The outcome of one [`DirWatcher::poll`].
#[derive(Debug)]
pub enum PollOutcome {
    /// Same contents as at the last poll.
    Unchanged,
    /// First poll, or the contents changed: a fresh load and its errors.
    Changed(ClusterState, Vec<SourceError>),
    /// The directory cannot be listed (it just went missing, or never was).
    Unreadable(SourceError),
}

/// Watches `dir`, publishing a fresh snapshot through `sender` whenever its
/// contents change (and once at the start). Each [`SourceError`] of a load
/// is logged once, with the load that produced it, not at every poll.
///
/// Meant for `tokio::spawn`; returns when every receiver is gone. The file
/// reads are blocking but small, so they run on the runtime directly.
pub async fn watch_dir(dir: PathBuf, interval: Duration, sender: watch::Sender<Arc<ClusterState>>) {
    let mut watcher = DirWatcher::new(dir);
    let mut ticker = tokio::time::interval(interval);
    // A slow poll should not be followed by a burst of catch-up polls.
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = sender.closed() => return,
        }
        let (state, errors) = match watcher.poll() {
            PollOutcome::Unchanged => continue,
            PollOutcome::Unreadable(error) => {
                log::warn!("{error}; keeping the last loaded state, retrying every {interval:?}");
                continue;
            }
            PollOutcome::Changed(state, errors) => (state, errors),
        };
        for error in &errors {
            log::warn!("{error}");
        }
        log::info!(
            "{}: loaded {} services, {} endpoint slices, {} nodes ({} errors)",
            watcher.dir().display(),
            state.services().count(),
            state.endpoint_slices().count(),
            state.nodes().count(),
            errors.len()
        );
        if sender.send(Arc::new(state)).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_yaml_parser_panic_is_an_error_of_the_file() {
        // Found by the manifest_model fuzz target: serde_yaml panics.
        let input = include_bytes!("fuzz_regressions/serde_yaml_end_of_mapping.yaml");
        let mut state = ClusterState::default();
        let errors = parse_manifest(Path::new("crash.yaml"), input, &mut state);
        assert!(
            errors
                .iter()
                .any(|e| e.to_string().starts_with("crash.yaml")),
            "{errors:?}"
        );
    }

    /// A scratch directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(label: &str) -> Self {
            use std::sync::atomic::{AtomicUsize, Ordering};
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let path = std::env::temp_dir().join(format!(
                "lb-agent-{label}-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&path).expect("create temp dir");
            TempDir(path)
        }

        fn write(&self, name: &str, contents: &str) {
            std::fs::write(self.0.join(name), contents).expect("write manifest");
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const SERVICE_WEB: &str = "apiVersion: v1\nkind: Service\nmetadata: {namespace: default, name: web}\nspec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}\n";

    fn parse(text: &str) -> (ClusterState, Vec<SourceError>) {
        let mut state = ClusterState::default();
        let errors = parse_manifest(Path::new("manifests/web.yaml"), text.as_bytes(), &mut state);
        (state, errors)
    }

    fn service_names(state: &ClusterState) -> Vec<String> {
        state.services().map(|(key, _)| key.to_string()).collect()
    }

    #[test]
    fn unparseable_file_does_not_stop_the_directory() {
        let dir = TempDir::new("load");
        dir.write(
            "a-bad.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: [unclosed\n",
        );
        dir.write(
            "b-good.yaml",
            &format!(
                "{SERVICE_WEB}---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  namespace: default\n  name: web-1\n  labels: {{kubernetes.io/service-name: web}}\naddressType: IPv4\nendpoints: []\n"
            ),
        );
        dir.write(
            "c-node.json",
            r#"{"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a"}}"#,
        );
        // Not manifests: hidden, other extension, subdirectory.
        dir.write(".hidden.yaml", "not: [valid");
        dir.write("notes.txt", "not: [valid");
        std::fs::create_dir(dir.0.join("sub.yaml")).expect("create subdir");

        let (state, errors) = load_dir(&dir.0);
        assert_eq!(errors.len(), 1, "{errors:#?}");
        assert_eq!(errors[0].file, dir.0.join("a-bad.yaml"));
        assert!(
            errors[0].to_string().starts_with(&format!(
                "{} document 1: ",
                dir.0.join("a-bad.yaml").display()
            )),
            "{}",
            errors[0]
        );
        assert_eq!(service_names(&state), ["default/web"]);
        assert!(state.endpoint_slice("default", "web-1").is_some());
        assert!(state.node("node-a").is_some());
    }

    #[test]
    fn missing_directory_is_one_error() {
        let dir = std::env::temp_dir().join(format!("lb-agent-missing-{}", std::process::id()));
        let (state, errors) = load_dir(&dir);
        assert!(state.is_empty());
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].file, dir);
        assert!(matches!(errors[0].problem, SourceProblem::Io(_)));
    }

    #[test]
    fn each_bad_document_is_reported_and_the_rest_loaded() {
        let text = [
            SERVICE_WEB,
            "just a string\n",
            "apiVersion: v1\nmetadata: {name: kindless}\n",
            "apiVersion: v1\nkind: Service\nmetadata: {namespace: default, name: broken}\nspec: {ports: oops}\n",
            "apiVersion: v1\nkind: Service\nmetadata: {namespace: default}\nspec: {}\n",
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {namespace: default, name: ignored}\n",
            "",
            "apiVersion: v1\nkind: Service\nmetadata: {namespace: other, name: api}\nspec: {clusterIP: 10.96.0.11}\n",
        ]
        .join("---\n");
        let (state, errors) = parse(&text);
        assert_eq!(service_names(&state), ["default/web", "other/api"]);
        let described: Vec<(Option<usize>, Option<&str>)> = errors
            .iter()
            .map(|error| (error.document, error.object.as_deref()))
            .collect();
        assert_eq!(
            described,
            [
                (Some(2), None),
                (Some(3), None),
                (Some(4), Some("Service default/broken")),
                (Some(5), Some("Service")),
            ],
            "{errors:#?}"
        );
        assert!(matches!(errors[0].problem, SourceProblem::NotAnObject));
        assert!(matches!(
            errors[1].problem,
            SourceProblem::MissingField("kind")
        ));
        assert!(matches!(
            errors[3].problem,
            SourceProblem::MissingField("metadata.name")
        ));
        assert_eq!(
            errors[2].to_string(),
            "manifests/web.yaml document 4 (Service default/broken): \
             spec.ports: invalid type: string \"oops\", expected a sequence"
        );
    }

    #[test]
    fn list_documents_are_loaded_and_metadata_stripped() {
        let text = r#"
apiVersion: v1
kind: List
metadata: {resourceVersion: ""}
items:
- apiVersion: v1
  kind: Service
  metadata:
    namespace: default
    name: web
    labels: {service.kubernetes.io/service-proxy-name: lb}
    annotations: {kubectl.kubernetes.io/last-applied-configuration: "{}"}
    managedFields:
    - {manager: kubectl, operation: Apply, apiVersion: v1}
  spec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}
- apiVersion: v1
  kind: Node
  metadata: {name: node-a}
- 42
"#;
        let (state, errors) = parse(text);
        assert_eq!(errors.len(), 1, "{errors:#?}");
        assert_eq!((errors[0].document, errors[0].item), (Some(1), Some(2)));
        assert!(
            errors[0]
                .to_string()
                .starts_with("manifests/web.yaml document 1 items[2]: ")
        );
        assert!(state.node("node-a").is_some());
        let metadata = &state
            .service("default", "web")
            .expect("service from the List")
            .metadata;
        assert_eq!(metadata.managed_fields, None);
        assert_eq!(metadata.annotations, None);
        assert_eq!(
            metadata
                .labels
                .as_ref()
                .and_then(|labels| labels.get("service.kubernetes.io/service-proxy-name"))
                .map(String::as_str),
            Some("lb")
        );
    }

    #[test]
    fn duplicate_key_spoils_its_document_only_and_syntax_error_ends_the_file() {
        let after = SERVICE_WEB.replace("name: web", "name: lost");
        let text = format!("a: 1\na: 2\n---\n{SERVICE_WEB}---\nb: }}\n---\n{after}");
        let (state, errors) = parse(&text);
        assert_eq!(service_names(&state), ["default/web"]);
        let documents: Vec<Option<usize>> = errors.iter().map(|error| error.document).collect();
        assert_eq!(documents, [Some(1), Some(3)], "{errors:#?}");
        assert!(
            errors
                .iter()
                .all(|error| matches!(error.problem, SourceProblem::Syntax(_)))
        );
    }

    #[test]
    fn missing_namespace_means_default() {
        let (state, errors) =
            parse("apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {}\n");
        assert!(errors.is_empty(), "{errors:#?}");
        assert_eq!(service_names(&state), ["default/web"]);
    }

    #[test]
    fn poll_reports_changes_only() {
        let dir = TempDir::new("poll");
        dir.write("web.yaml", SERVICE_WEB);
        let mut watcher = DirWatcher::new(&dir.0);
        assert!(matches!(watcher.poll(), PollOutcome::Changed(_, errors) if errors.is_empty()));
        assert!(matches!(watcher.poll(), PollOutcome::Unchanged));
        // Same length, same second: only the content hash tells.
        dir.write("web.yaml", &SERVICE_WEB.replace("10.96.0.10", "10.96.0.20"));
        match watcher.poll() {
            PollOutcome::Changed(state, _) => {
                let spec = state
                    .service("default", "web")
                    .and_then(|service| service.spec.as_ref());
                assert_eq!(
                    spec.and_then(|spec| spec.cluster_ip.as_deref()),
                    Some("10.96.0.20")
                );
            }
            other => panic!("edit not seen: {other:?}"),
        }
        std::fs::remove_dir_all(&dir.0).expect("remove dir");
        assert!(matches!(watcher.poll(), PollOutcome::Unreadable(_)));
        assert!(
            matches!(watcher.poll(), PollOutcome::Unchanged),
            "reported once"
        );
        std::fs::create_dir_all(&dir.0).expect("recreate dir");
        dir.write("web.yaml", SERVICE_WEB);
        assert!(
            matches!(watcher.poll(), PollOutcome::Changed(..)),
            "directory back"
        );
    }

    #[tokio::test]
    async fn watcher_publishes_a_new_state_on_change() {
        let dir = TempDir::new("watch");
        dir.write("web.yaml", SERVICE_WEB);
        let (sender, mut receiver) = watch::channel(Arc::new(ClusterState::default()));
        let task = tokio::spawn(watch_dir(dir.0.clone(), Duration::from_millis(20), sender));

        let wait = Duration::from_secs(5);
        tokio::time::timeout(
            wait,
            receiver.wait_for(|state| state.service("default", "web").is_some()),
        )
        .await
        .expect("initial load published within 5 s")
        .expect("watcher alive");

        dir.write("api.yaml", &SERVICE_WEB.replace("name: web", "name: api"));
        tokio::time::timeout(
            wait,
            receiver.wait_for(|state| state.service("default", "api").is_some()),
        )
        .await
        .expect("change published within 5 s")
        .expect("watcher alive");

        drop(receiver);
        tokio::time::timeout(wait, task)
            .await
            .expect("watcher stops once the receiver is gone")
            .expect("watcher task did not panic");
    }
}

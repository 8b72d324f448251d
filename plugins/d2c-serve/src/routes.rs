//! The routing table: task -> adapter, built once from a manifest whose files were checked
//! against their blake3 hashes, then shared read-only (`Arc`) by every request.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use d2c_format::manifest::{hash_file, Manifest};
use serde_json::{json, Value};

/// One adapter as llama-server will load it: its id is its index in the manifest.
#[derive(Debug, Clone)]
pub struct AdapterSlot {
    /// As written in the manifest (relative to its directory): what logs and headers show.
    pub file: String,
    /// Canonical absolute path, as passed to llama-server.
    pub path: PathBuf,
    pub blake3: String,
    pub tasks: Vec<String>,
}

/// Where a request goes: no task means the base model alone; a task, its entry in the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Base,
    Task(usize),
}

/// How one task is served: its adapter, at its scale (the manifest's `task_scales`), as the
/// per-request `lora` list says it to llama-server.
#[derive(Debug)]
struct TaskRoute {
    adapter: usize,
    scale: f32,
    lora: Value,
}

#[derive(Debug)]
pub struct RoutingTable {
    manifest: PathBuf,
    base_model: PathBuf,
    adapters: Vec<AdapterSlot>,
    tasks: HashMap<String, usize>,
    /// Per-request `lora` lists, built once per task. Every id is listed, the chosen one at the
    /// task's scale and the rest at 0, so nothing depends on llama-server's defaults for
    /// unlisted ids or on its global scales (an empty list would mean "use the global scales").
    routes: Vec<TaskRoute>,
    lora_for_base: Value,
    models_body: Bytes,
}

impl RoutingTable {
    /// Reads the manifest and checks the blake3 of the base model and of every adapter.
    /// Errors name the offending file.
    pub fn load(manifest_path: &Path) -> Result<Self> {
        // d2c_format's errors already name the file; `anyhow!` keeps them from being printed twice.
        let manifest = Manifest::read(manifest_path).map_err(|e| anyhow!("cannot read manifest: {e}"))?;
        let dir = manifest_path.parent().map(Path::to_path_buf).unwrap_or_default();

        let base_model = resolve(&dir, Path::new(&manifest.base.file));
        verify_file("base model", &base_model, &manifest.base.blake3)?;
        let base_model = base_model.canonicalize().with_context(|| format!("base model {}", base_model.display()))?;

        let mut adapters = Vec::with_capacity(manifest.adapters.len());
        for (i, entry) in manifest.adapters.iter().enumerate() {
            let path = resolve(&dir, Path::new(&entry.file));
            verify_file(&format!("adapter {i} ({})", entry.file), &path, &entry.blake3)?;
            let path = path.canonicalize().with_context(|| format!("adapter {}", path.display()))?;
            if path.to_string_lossy().contains(',') {
                // llama-server takes all adapters as one comma-separated `--lora` list.
                bail!("adapter {}: the path contains a comma, which llama-server's --lora list cannot carry; rename it", path.display());
            }
            adapters.push(AdapterSlot { file: entry.file.clone(), path, blake3: entry.blake3.clone(), tasks: entry.tasks.clone() });
        }
        Ok(Self::new(manifest_path.to_path_buf(), base_model, adapters, &manifest))
    }

    fn new(manifest_path: PathBuf, base_model: PathBuf, adapters: Vec<AdapterSlot>, manifest: &Manifest) -> Self {
        let lora_list = |chosen: Option<(usize, f32)>| -> Value {
            Value::Array(
                (0..adapters.len()).map(|id| json!({"id": id, "scale": chosen.filter(|&(c, _)| c == id).map_or(0.0, |(_, scale)| scale)})).collect(),
            )
        };
        let lora_for_base = lora_list(None);
        let mut tasks = HashMap::new();
        let mut routes = Vec::with_capacity(manifest.tasks.len());
        for (task, &adapter) in &manifest.tasks {
            let scale = manifest.task_scale(task);
            tasks.insert(task.clone(), routes.len());
            routes.push(TaskRoute { adapter, scale, lora: lora_list(Some((adapter, scale))) });
        }
        let created = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        // BTreeMap order: a stable listing.
        let models: Vec<Value> = manifest
            .tasks
            .iter()
            .map(|(task, &i)| {
                json!({"id": task, "object": "model", "created": created, "owned_by": "d2c-serve", "adapter": adapters[i].file, "scale": manifest.task_scale(task)})
            })
            .collect();
        let models_body = Bytes::from(serde_json::to_vec(&json!({"object": "list", "data": models})).unwrap_or_default());
        RoutingTable { manifest: manifest_path, base_model, adapters, tasks, routes, lora_for_base, models_body }
    }

    /// A table with no adapters and no tasks, for unit tests of what holds tables.
    #[cfg(test)]
    pub(crate) fn empty_for_tests() -> Self {
        RoutingTable {
            manifest: PathBuf::from("manifest.json"),
            base_model: PathBuf::from("base.gguf"),
            adapters: Vec::new(),
            tasks: HashMap::new(),
            routes: Vec::new(),
            lora_for_base: Value::Array(Vec::new()),
            models_body: Bytes::new(),
        }
    }

    /// `None` or an empty name means the base model; an unknown name is `Err(name)`.
    pub fn route<'a>(&self, task: Option<&'a str>) -> Result<Route, &'a str> {
        match task {
            None | Some("") => Ok(Route::Base),
            Some(name) => self.tasks.get(name).map(|&i| Route::Task(i)).ok_or(name),
        }
    }

    /// The per-request `lora` field for `route`; `None` when the manifest has no adapters.
    pub fn lora_field(&self, route: Route) -> Option<&Value> {
        if self.adapters.is_empty() {
            return None;
        }
        Some(match route {
            Route::Base => &self.lora_for_base,
            Route::Task(t) => &self.routes[t].lora,
        })
    }

    pub fn adapter(&self, route: Route) -> Option<&AdapterSlot> {
        match route {
            Route::Base => None,
            Route::Task(t) => self.adapters.get(self.routes[t].adapter),
        }
    }

    /// The scale the route's adapter is applied at (`None` for the base model).
    pub fn scale(&self, route: Route) -> Option<f32> {
        match route {
            Route::Base => None,
            Route::Task(t) => Some(self.routes[t].scale),
        }
    }

    pub fn adapters(&self) -> &[AdapterSlot] {
        &self.adapters
    }

    pub fn base_model(&self) -> &Path {
        &self.base_model
    }

    pub fn manifest(&self) -> &Path {
        &self.manifest
    }

    pub fn task_count(&self) -> usize {
        self.tasks.len()
    }

    /// `GET /v1/models` body: the tasks, as OpenAI "models".
    pub fn models_body(&self) -> Bytes {
        self.models_body.clone()
    }
}

fn resolve(dir: &Path, file: &Path) -> PathBuf {
    if file.is_absolute() {
        file.to_path_buf()
    } else {
        dir.join(file)
    }
}

fn verify_file(what: &str, path: &Path, expected: &str) -> Result<()> {
    if !path.is_file() {
        bail!("{what} {} is missing (named in the manifest)", path.display());
    }
    let actual = hash_file(path).map_err(|e| anyhow!("{what}: {e}"))?;
    if !actual.eq_ignore_ascii_case(expected) {
        bail!("{what} {} does not match the manifest: blake3 is {actual}, the manifest says {expected}", path.display());
    }
    Ok(())
}

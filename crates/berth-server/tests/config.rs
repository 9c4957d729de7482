//! The configuration's layers: the README's table lists every key with its environment
//! variables, every key's variable reaches it, the environment overrides the file, and a
//! value outside a closed set stops the load naming the key and the values allowed.

use berth_server::config::{env_name, keys, Config, LEGACY_ENV};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

/// The environment is the process's: tests that change it take turns.
static ENV: Mutex<()> = Mutex::new(());

fn set(k: &str, v: &str) {
    std::env::set_var(k, v);
}

fn unset(k: &str) {
    std::env::remove_var(k);
}

/// The README's configuration table: key → the environment variables its row names.
fn readme_table() -> BTreeMap<String, Vec<String>> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md");
    let text = std::fs::read_to_string(path).expect("README.md");
    let section = text
        .split("\n## Configuration\n")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("a Configuration section");
    let mut rows = BTreeMap::new();
    for line in section.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = line.split(" | ").collect();
        let key = cells[0]
            .trim_start_matches("| ")
            .trim_matches('`')
            .to_string();
        let envs = cells
            .get(1)
            .map(|c| {
                c.split(", ")
                    .map(|e| e.trim_matches('`').to_string())
                    .collect()
            })
            .unwrap_or_default();
        assert!(rows.insert(key.clone(), envs).is_none(), "{key} twice");
    }
    rows
}

#[test]
fn readme_table_lists_every_key_with_its_variables() {
    let table = readme_table();
    let struct_keys: BTreeSet<String> = keys().into_iter().collect();
    let documented: BTreeSet<String> = table.keys().cloned().collect();
    assert!(struct_keys.len() > 40, "{struct_keys:?}");
    assert_eq!(
        struct_keys.difference(&documented).collect::<Vec<_>>(),
        Vec::<&String>::new(),
        "keys missing from the README's table"
    );
    assert_eq!(
        documented.difference(&struct_keys).collect::<Vec<_>>(),
        Vec::<&String>::new(),
        "README rows for keys the config does not have"
    );
    for (key, envs) in &table {
        let mut expected = vec![env_name(key)];
        for (name, sets) in LEGACY_ENV {
            if sets.contains(&key.as_str()) {
                expected.push(name.to_string());
            }
        }
        assert_eq!(envs, &expected, "the README row of {key}");
    }
    // No two keys share a variable.
    let names: BTreeSet<String> = struct_keys.iter().map(|k| env_name(k)).collect();
    assert_eq!(names.len(), struct_keys.len());
}

/// Values tried for each key's variable, until one loads and changes the key.
const CANDIDATES: &[&str] = &[
    "3",
    "true",
    "127.0.0.1:7799",
    "docker",
    "bearer",
    "json",
    "power",
    "resources",
    "edge.example=127.0.0.1:1",
    "[{model = \"m\", input = 1, output = 2}]",
    "[{name = \"p\", size = 1}]",
    "ext4",
];

fn at(cfg: &Config, key: &str) -> serde_json::Value {
    let v = serde_json::to_value(cfg).expect("serialize");
    v.pointer(&format!("/{}", key.replace('.', "/")))
        .cloned()
        .unwrap_or_else(|| panic!("{key} not in the config"))
}

#[test]
fn every_key_is_set_by_its_variable_and_older_names_still_work() {
    let _env = ENV.lock().unwrap_or_else(|e| e.into_inner());
    let base = Config::load(None).expect("defaults load");
    for key in keys() {
        let name = env_name(&key);
        let before = at(&base, &key);
        let mut reached = None;
        for c in CANDIDATES {
            set(&name, c);
            let loaded = Config::load(None);
            unset(&name);
            if let Ok(cfg) = loaded {
                if at(&cfg, &key) != before {
                    reached = Some(at(&cfg, &key));
                    break;
                }
            }
        }
        assert!(reached.is_some(), "{name} does not set {key}");
    }
    for (name, sets) in LEGACY_ENV {
        let mut reached = false;
        for c in CANDIDATES {
            set(name, c);
            let loaded = Config::load(None);
            unset(name);
            if let Ok(cfg) = loaded {
                if sets.iter().all(|k| at(&cfg, k) != at(&base, k)) {
                    reached = true;
                    break;
                }
            }
        }
        assert!(reached, "{name} does not set {sets:?}");
    }
    // The canonical name wins over the older one.
    set("BERTH_CONN_IDLE_TIMEOUT_S", "11");
    set("BERTH_LISTENER_IDLE_TIMEOUT_S", "12");
    let cfg = Config::load(None);
    unset("BERTH_CONN_IDLE_TIMEOUT_S");
    unset("BERTH_LISTENER_IDLE_TIMEOUT_S");
    assert_eq!(cfg.expect("load").listener.idle_timeout_s, 12);
}

#[test]
fn environment_overrides_the_file() {
    let _env = ENV.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("berth.toml");
    std::fs::write(
        &file,
        "log_format = \"json\"\nhook_rate_per_minute = 5\n\n[listener]\nidle_timeout_s = 5\n\n[egress]\nca_files = [\"/a.pem\"]\noverrides = { \"x.example\" = \"127.0.0.1:1\" }\n",
    )
    .expect("write");
    let from_file = Config::load(Some(&file)).expect("load");
    assert_eq!(from_file.listener.idle_timeout_s, 5);
    assert_eq!(from_file.hook_rate_per_minute, 5);
    assert_eq!(from_file.log_format, berth_server::config::LogFormat::Json);

    set("BERTH_LISTENER_IDLE_TIMEOUT_S", "7");
    set("BERTH_HOOK_RATE_PER_MINUTE", "9");
    set("BERTH_LOG_FORMAT", "text");
    set("BERTH_EGRESS_CA_FILE", "/b.pem");
    set("BERTH_EGRESS_OVERRIDES", "y.example=127.0.0.1:2");
    set("BERTH_NODE_LABELS", "zone=a, disk=ssd");
    let cfg = Config::load(Some(&file));
    for k in [
        "BERTH_LISTENER_IDLE_TIMEOUT_S",
        "BERTH_HOOK_RATE_PER_MINUTE",
        "BERTH_LOG_FORMAT",
        "BERTH_EGRESS_CA_FILE",
        "BERTH_EGRESS_OVERRIDES",
        "BERTH_NODE_LABELS",
    ] {
        unset(k);
    }
    let cfg = cfg.expect("load");
    assert_eq!(cfg.listener.idle_timeout_s, 7);
    assert_eq!(cfg.hook_rate_per_minute, 9);
    assert_eq!(cfg.log_format, berth_server::config::LogFormat::Text);
    // The older single-file variable adds to the file's list; overrides add names.
    assert_eq!(
        cfg.egress.ca_files,
        vec![
            std::path::PathBuf::from("/a.pem"),
            std::path::PathBuf::from("/b.pem")
        ]
    );
    assert_eq!(cfg.egress.overrides.len(), 2, "{:?}", cfg.egress.overrides);
    // Node labels are `key=value,…`.
    assert_eq!(
        cfg.node_labels.iter().collect::<Vec<_>>(),
        vec![
            (&"disk".to_string(), &"ssd".to_string()),
            (&"zone".into(), &"a".into())
        ]
    );

    // A file that is named but missing is an error, not an empty layer.
    let err = Config::load(Some(&dir.path().join("nope.toml"))).expect_err("missing file");
    assert!(err.to_string().contains("nope.toml"), "{err}");
}

#[test]
fn closed_sets_are_checked_at_load_naming_key_and_values() {
    let _env = ENV.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("berth.toml");
    for (toml, key, allowed) in [
        ("log_format = \"xml\"", "log_format", &["text", "json"][..]),
        (
            "default_backend = \"qemu\"",
            "default_backend",
            &["native", "docker", "gvisor"],
        ),
        (
            "upstream_auth = \"basic\"",
            "upstream_auth",
            &["x-api-key", "bearer"],
        ),
        ("durability = \"disk\"", "durability", &["crash", "power"]),
        (
            "[cost]\nbox_hour_scale = \"cpu\"",
            "box_hour_scale",
            &["flat", "resources"],
        ),
    ] {
        std::fs::write(&file, toml).expect("write");
        let err = Config::load(Some(&file)).expect_err(toml).to_string();
        assert!(err.contains(key), "{toml}: {err}");
        assert!(err.contains("berth.toml"), "{toml}: {err}");
        for a in allowed {
            assert!(err.contains(a), "{toml}: {err}");
        }
    }
    set("BERTH_DURABILITY", "disk");
    let err = Config::load(None);
    unset("BERTH_DURABILITY");
    let err = err.expect_err("BERTH_DURABILITY=disk").to_string();
    for want in ["durability", "BERTH_DURABILITY", "crash", "power"] {
        assert!(err.contains(want), "{err}");
    }
    set("BERTH_BACKEND", "qemu");
    let err = Config::load(None);
    unset("BERTH_BACKEND");
    let err = err.expect_err("BERTH_BACKEND=qemu").to_string();
    for want in ["default_backend", "BERTH_BACKEND", "native", "gvisor"] {
        assert!(err.contains(want), "{err}");
    }
    // Unknown keys in the file are still refused.
    std::fs::write(&file, "listen_on = \"x\"").expect("write");
    let err = Config::load(Some(&file))
        .expect_err("unknown key")
        .to_string();
    assert!(err.contains("listen_on"), "{err}");
}

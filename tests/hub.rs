//! Model resolution: Hub references found in a cache laid out like the Hugging Face one, offline.

use std::path::{Path, PathBuf};

use hypura::hub::{resolve, HubOptions, ModelRef};

/// Lays out `models--ORG--REPO/{refs/main, snapshots/<commit>/<files>}` under `root`.
fn lay_out_cache(root: &Path, repo: &str, files: &[(&str, &[u8])]) -> PathBuf {
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let repo_dir = root.join(format!("models--{}", repo.replace('/', "--")));
    std::fs::create_dir_all(repo_dir.join("refs")).unwrap();
    std::fs::write(repo_dir.join("refs/main"), commit).unwrap();
    let snap = repo_dir.join("snapshots").join(commit);
    std::fs::create_dir_all(&snap).unwrap();
    for (name, bytes) in files {
        std::fs::write(snap.join(name), bytes).unwrap();
    }
    snap
}

fn temp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("hypura-hub-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn offline(cache_dir: PathBuf) -> HubOptions {
    HubOptions {
        cache_dir,
        offline: true,
        progress: false,
    }
}

#[test]
fn finds_a_cached_file_offline() {
    let root = temp("single");
    let model = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("models/hypura-tiny-random-Q8_0.gguf"),
    )
    .unwrap();
    let snap = lay_out_cache(&root, "someone/tiny-GGUF", &[("tiny.gguf", &model)]);
    let r = ModelRef::parse("someone/tiny-GGUF:tiny.gguf").unwrap();
    let path = resolve(&r, &offline(root.clone())).unwrap();
    assert_eq!(path, snap.join("tiny.gguf"));
    // ...and it loads.
    let m = hypura::loader::load(&path, &Default::default()).unwrap();
    assert_eq!(m.config.n_layer, 4);
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn split_sets_need_every_part() {
    let root = temp("split");
    let parts = ["m-00001-of-00002.gguf", "m-00002-of-00002.gguf"];
    let snap = lay_out_cache(
        &root,
        "org/split-GGUF",
        &[(parts[0], b"x"), (parts[1], b"y")],
    );
    let r = ModelRef::parse(&format!("org/split-GGUF:{}", parts[0])).unwrap();
    assert_eq!(
        resolve(&r, &offline(root.clone())).unwrap(),
        snap.join(parts[0])
    );
    std::fs::remove_file(snap.join(parts[1])).unwrap();
    let msg = resolve(&r, &offline(root.clone())).unwrap_err().to_string();
    assert!(
        msg.contains(parts[1]) && msg.contains("HF_HUB_OFFLINE"),
        "{msg}"
    );
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn offline_miss_and_missing_path_are_clear_errors() {
    let root = temp("miss");
    let r = ModelRef::parse("org/none-GGUF:none.gguf").unwrap();
    let msg = resolve(&r, &offline(root.clone())).unwrap_err().to_string();
    assert!(
        msg.contains("none.gguf") && msg.contains("not in the Hub cache"),
        "{msg}"
    );
    let msg = resolve(
        &ModelRef::parse("/no/such/model.gguf").unwrap(),
        &offline(root.clone()),
    )
    .unwrap_err()
    .to_string();
    assert!(
        msg.contains("/no/such/model.gguf") && msg.contains("no such file"),
        "{msg}"
    );
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn unreachable_hub_fails_quickly() {
    // No network here (and none needed): an online attempt must end in an error, not a hang.
    let root = temp("online");
    let opts = HubOptions {
        cache_dir: root.clone(),
        offline: false,
        progress: false,
    };
    let start = std::time::Instant::now();
    let r = ModelRef::parse("org/none-GGUF:none.gguf").unwrap();
    if let Err(e) = resolve(&r, &opts) {
        assert!(e.to_string().contains("none.gguf"), "{e}");
    }
    assert!(
        start.elapsed().as_secs() < 120,
        "took {:?}",
        start.elapsed()
    );
    let _ = std::fs::remove_dir_all(&root);
}

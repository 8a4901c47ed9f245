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
        let p = snap.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, bytes).unwrap();
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
        cache_dir: Some(cache_dir),
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
    // No network here: an online attempt must end in an error, not a hang. (With a network, the
    // Hub answers 401/404 for this made-up repository: an error too.)
    let root = temp("online");
    let opts = HubOptions {
        cache_dir: Some(root.clone()),
        offline: false,
        progress: false,
    };
    let start = std::time::Instant::now();
    let r = ModelRef::parse("hypura-test-org/no-such-repo-GGUF:none.gguf").unwrap();
    let msg = resolve(&r, &opts).unwrap_err().to_string();
    let took = start.elapsed();
    eprintln!("online attempt failed in {took:?}: {msg}");
    assert!(
        msg.contains("none.gguf") && msg.contains("downloading it failed"),
        "{msg}"
    );
    assert!(
        took < hypura::hub::HUB_CONNECT_TIMEOUT + std::time::Duration::from_secs(10),
        "took {took:?}"
    );
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn split_set_offline_names_every_missing_part() {
    let root = temp("split3");
    let parts = [
        "Q4/m-00001-of-00003.gguf",
        "Q4/m-00002-of-00003.gguf",
        "Q4/m-00003-of-00003.gguf",
    ];
    let snap = lay_out_cache(
        &root,
        "org/split3-GGUF",
        &[(parts[0], b"1"), (parts[2], b"3")],
    );
    let r = ModelRef::parse(&format!("org/split3-GGUF:{}", parts[0])).unwrap();
    let msg = resolve(&r, &offline(root.clone())).unwrap_err().to_string();
    assert!(
        msg.contains(parts[1]) && !msg.contains(parts[2]) && msg.contains("1 of the 3 parts"),
        "{msg}"
    );
    std::fs::write(snap.join(parts[1]), b"2").unwrap();
    assert_eq!(
        resolve(&r, &offline(root.clone())).unwrap(),
        snap.join(parts[0])
    );
    // Naming a later part resolves just that file.
    let r2 = ModelRef::parse(&format!("org/split3-GGUF:{}", parts[1])).unwrap();
    assert_eq!(
        resolve(&r2, &offline(root.clone())).unwrap(),
        snap.join(parts[1])
    );
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn revisions_other_than_main() {
    let root = temp("rev");
    let snap = lay_out_cache(&root, "org/rev-GGUF", &[("a.gguf", b"a")]);
    let commit = snap.file_name().unwrap().to_str().unwrap().to_string();
    // A commit hash needs no ref; a branch without a ref is not cached.
    let r = ModelRef::parse(&format!("org/rev-GGUF:a.gguf@{commit}")).unwrap();
    assert_eq!(
        resolve(&r, &offline(root.clone())).unwrap(),
        snap.join("a.gguf")
    );
    let r = ModelRef::parse("org/rev-GGUF:a.gguf@dev").unwrap();
    assert!(resolve(&r, &offline(root.clone())).is_err());
    let refs = root.join("models--org--rev-GGUF/refs");
    std::fs::write(refs.join("dev"), &commit).unwrap();
    assert_eq!(
        resolve(&r, &offline(root.clone())).unwrap(),
        snap.join("a.gguf")
    );
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn default_model_falls_back_to_the_bundled_one() {
    let root = temp("default");
    let (path, why) = hypura::hub::default_model(&offline(root.clone())).unwrap();
    assert!(
        why.contains("bundled model") && why.contains("random weights"),
        "{why}"
    );
    assert_eq!(
        std::fs::read(&path).unwrap(),
        std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("models/hypura-tiny-random-Q8_0.gguf")
        )
        .unwrap()
    );
    assert_eq!(hypura::hub::bundled_model_path().unwrap(), path);
    // With the default model in the cache, that one is used.
    let (repo, file) = hypura::hub::DEFAULT_HUB_MODEL.split_once(':').unwrap();
    let snap = lay_out_cache(&root, repo, &[(file, b"stand-in")]);
    let (path, why) = hypura::hub::default_model(&offline(root.clone())).unwrap();
    assert_eq!(path, snap.join(file));
    assert!(why.contains(hypura::hub::DEFAULT_HUB_MODEL), "{why}");
    let _ = std::fs::remove_dir_all(&root);
}

//! How much RAM there is and how much hypura may use. Linux: `/proc/meminfo`, narrowed by the
//! memory cgroup the process runs in (v1 or v2), since a container's limit — page cache included —
//! is what the OOM killer enforces. macOS: `sysctl hw.memsize` and `vm_stat` (free + inactive
//! pages, what can be had without compressing or swapping).

use std::path::{Path, PathBuf};

/// RAM as the process sees it.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MemoryInfo {
    pub total_bytes: u64,
    /// What could be taken without swapping: `MemAvailable`, or the cgroup headroom if smaller.
    pub available_bytes: u64,
    /// The cgroup's limit, when one is set.
    pub cgroup_limit_bytes: Option<u64>,
    /// `"v1"` or `"v2"` when a limit was found.
    pub cgroup_version: Option<String>,
}

/// Reads the current memory picture.
#[cfg(target_os = "macos")]
pub fn read_memory() -> MemoryInfo {
    let run = |cmd: &str, args: &[&str]| {
        std::process::Command::new(cmd)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    let total = run("/usr/sbin/sysctl", &["-n", "hw.memsize"])
        .trim()
        .parse::<u64>()
        .unwrap_or(0);
    let available = vm_stat_available(&run("/usr/bin/vm_stat", &[])).unwrap_or(0);
    MemoryInfo {
        total_bytes: total,
        available_bytes: available.min(total),
        cgroup_limit_bytes: None,
        cgroup_version: None,
    }
}

/// Bytes that can be had without compressing or swapping, from `vm_stat`'s output: free plus
/// inactive pages (as psutil counts macOS's available memory), at the page size its first line
/// names. `None` when the text lacks them.
#[cfg(any(test, target_os = "macos"))]
fn vm_stat_available(text: &str) -> Option<u64> {
    let page_bytes: u64 = text
        .lines()
        .next()?
        .split("page size of ")
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let pages = |name: &str| -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches('.').parse().ok())
    };
    Some((pages("Pages free:")? + pages("Pages inactive:")?) * page_bytes)
}

/// Reads the current memory picture.
#[cfg(not(target_os = "macos"))]
pub fn read_memory() -> MemoryInfo {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| -> Option<u64> {
        meminfo
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map(|kib| kib * 1024)
    };
    let total = field("MemTotal:").unwrap_or(0);
    let available = field("MemAvailable:").unwrap_or(total);
    let cg = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|c| cgroup_limit(&c, Path::new("/sys/fs/cgroup")));
    let mut info = MemoryInfo {
        total_bytes: total,
        available_bytes: available,
        cgroup_limit_bytes: None,
        cgroup_version: None,
    };
    if let Some(limit) = cg {
        info.cgroup_limit_bytes = Some(limit.limit);
        info.cgroup_version = Some(limit.version.to_string());
        info.total_bytes = info.total_bytes.min(limit.limit);
        info.available_bytes = info
            .available_bytes
            .min(limit.limit.saturating_sub(limit.unreclaimable));
    }
    info
}

/// A memory cgroup limit and what in it cannot be reclaimed.
#[derive(Debug, PartialEq)]
pub struct CgroupLimit {
    pub version: &'static str,
    pub limit: u64,
    /// Usage minus inactive file cache (which the kernel reclaims at the limit).
    pub unreclaimable: u64,
}

/// The tightest memory limit on the path from the process's cgroup to the root, read from the
/// hierarchy mounted at `root` (normally `/sys/fs/cgroup`). `proc_cgroup` is the text of
/// `/proc/self/cgroup`. Unlimited (`max`, or v1's huge sentinel) counts as no limit.
pub fn cgroup_limit(proc_cgroup: &str, root: &Path) -> Option<CgroupLimit> {
    // v1: "N:memory:/path"; v2: "0::/path".
    for line in proc_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, rel) = (parts.next()?, parts.next()?, parts.next()?);
        let rel = rel.trim_start_matches('/');
        if controllers.split(',').any(|c| c == "memory") {
            return walk(
                &root.join("memory"),
                rel,
                "v1",
                "memory.limit_in_bytes",
                "memory.usage_in_bytes",
                "total_inactive_file",
            );
        }
        if controllers.is_empty() && root.join("cgroup.controllers").exists() {
            return walk(
                root,
                rel,
                "v2",
                "memory.max",
                "memory.current",
                "inactive_file",
            );
        }
    }
    None
}

fn walk(
    base: &Path,
    rel: &str,
    version: &'static str,
    limit_f: &str,
    usage_f: &str,
    inactive_key: &str,
) -> Option<CgroupLimit> {
    let mut best: Option<CgroupLimit> = None;
    let mut dir = PathBuf::from(base);
    let mut dirs = vec![dir.clone()];
    for comp in rel.split('/').filter(|c| !c.is_empty()) {
        dir = dir.join(comp);
        dirs.push(dir.clone());
    }
    for d in dirs {
        let Some(limit) = read_u64(&d.join(limit_f)) else {
            continue;
        };
        if limit >= 1 << 60 {
            continue; // unlimited
        }
        let usage = read_u64(&d.join(usage_f)).unwrap_or(0);
        let inactive = std::fs::read_to_string(d.join("memory.stat"))
            .ok()
            .and_then(|s| {
                s.lines().find_map(|l| {
                    l.strip_prefix(inactive_key)
                        .and_then(|v| v.trim().parse::<u64>().ok())
                })
            })
            .unwrap_or(0);
        let c = CgroupLimit {
            version,
            limit,
            unreclaimable: usage.saturating_sub(inactive),
        };
        if best.as_ref().is_none_or(|b| {
            c.limit.saturating_sub(c.unreclaimable) < b.limit.saturating_sub(b.unreclaimable)
        }) {
            best = Some(c);
        }
    }
    best
}

fn read_u64(p: &Path) -> Option<u64> {
    let s = std::fs::read_to_string(p).ok()?;
    let s = s.trim();
    if s == "max" {
        return Some(u64::MAX);
    }
    s.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("hypura-cg-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn put(p: &Path, s: &str) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, s).unwrap();
    }

    #[test]
    fn v1_limit_of_a_child_group() {
        let root = tree("v1");
        put(
            &root.join("memory/memory.limit_in_bytes"),
            "9223372036854771712\n",
        );
        put(
            &root.join("memory/a/b/memory.limit_in_bytes"),
            "419430400\n",
        );
        put(
            &root.join("memory/a/b/memory.usage_in_bytes"),
            "300000000\n",
        );
        put(
            &root.join("memory/a/b/memory.stat"),
            "cache 1\ntotal_inactive_file 100000000\n",
        );
        let got = cgroup_limit("9:memory:/a/b\n", &root).unwrap();
        assert_eq!(
            got,
            CgroupLimit {
                version: "v1",
                limit: 419430400,
                unreclaimable: 200000000
            }
        );
        let _ = std::fs::remove_dir_all(&root);
    }

    /// `vm_stat` as macOS 14 prints it on an Apple Silicon Mac (16 KiB pages).
    #[test]
    fn macos_available_from_vm_stat() {
        let text = "Mach Virtual Memory Statistics: (page size of 16384 bytes)\n\
            Pages free:                               13919.\n\
            Pages active:                            211567.\n\
            Pages inactive:                          209282.\n\
            Pages speculative:                         1820.\n\
            Pages wired down:                        117484.\n\
            \"Translation faults\":                 251740394.\n";
        assert_eq!(vm_stat_available(text), Some((13919 + 209282) * 16384));
        assert_eq!(vm_stat_available("Pages free: 3.\n"), None);
        assert_eq!(vm_stat_available(""), None);
    }

    #[test]
    fn v2_limit_and_unlimited() {
        let root = tree("v2");
        put(&root.join("cgroup.controllers"), "memory\n");
        put(&root.join("user/memory.max"), "max\n");
        put(&root.join("user/job/memory.max"), "1073741824\n");
        put(&root.join("user/job/memory.current"), "536870912\n");
        put(
            &root.join("user/job/memory.stat"),
            "anon 1\ninactive_file 268435456\n",
        );
        let got = cgroup_limit("0::/user/job\n", &root).unwrap();
        assert_eq!(
            got,
            CgroupLimit {
                version: "v2",
                limit: 1073741824,
                unreclaimable: 268435456
            }
        );
        assert_eq!(cgroup_limit("0::/user\n", &root), None);
        let _ = std::fs::remove_dir_all(&root);
    }
}

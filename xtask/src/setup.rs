//! Installs what the VM needs on the host: Debian packages, virtme-ng, and a stock Debian
//! kernel with IPVS (downloaded once and cached under `target/vm/kernel`).

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::util::{have, output, run, target_dir};

/// Programs the VM tests use, and the Debian package providing each. The guest sees the host's
/// root filesystem, so these are installed on the host.
const TOOLS: &[(&str, &str)] = &[
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("modprobe", "kmod"),
    ("depmod", "kmod"),
    ("ip", "iproute2"),
    ("ipvsadm", "ipvsadm"),
    ("nft", "nftables"),
    ("conntrack", "conntrack"),
    // The cluster scenario replays kube-proxy's rules and sets before kube-ipvs takes over.
    ("ipset", "ipset"),
    ("iptables-restore", "iptables"),
    ("busybox", "busybox-static"),
    ("unshare", "util-linux"),
];

/// The Debian meta-package whose dependency names the current stock kernel.
const KERNEL_META_PACKAGE: &str = "linux-image-amd64";

/// A kernel ready to boot: its image, and its modules installed under `/lib/modules`.
pub(crate) struct Kernel {
    /// The bzImage.
    pub(crate) image: PathBuf,
    /// `uname -r` of the kernel.
    pub(crate) release: String,
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    fs::metadata("/proc/self").is_ok_and(|me| me.uid() == 0)
}

/// Installs missing Debian packages and virtme-ng.
pub(crate) fn ensure_tools() -> Result<()> {
    let mut missing: Vec<&str> =
        TOOLS.iter().filter(|(program, _)| !have(program)).map(|(_, package)| *package).collect();
    missing.dedup();
    if !missing.is_empty() {
        eprintln!("xtask: installing Debian packages the VM tests need: {}", missing.join(" "));
        if !is_root() {
            bail!("installing {} needs root; run as root or install them", missing.join(" "));
        }
        apt_update()?;
        let mut install = Command::new("apt-get");
        install
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive");
        run(install)?;
    }
    if vng().is_none() {
        eprintln!("xtask: installing virtme-ng (PyPI), which boots the test kernel");
        let pip = |extra: &[&str]| {
            let mut command = Command::new("python3");
            command.args(["-m", "pip", "install", "--quiet"]).args(extra).arg("virtme-ng");
            run(command)
        };
        if pip(&[]).is_err() {
            // Debian's own Python refuses to install into the system without this flag.
            pip(&["--break-system-packages"])?;
        }
        if vng().is_none() {
            bail!("virtme-ng is installed but its `vng` command cannot be found");
        }
    }
    Ok(())
}

/// The `vng` command: on the PATH, or in the scripts directory of the `python3` that pip
/// installed it for (pyenv, for one, shows new commands on the PATH only after a rehash).
pub(crate) fn vng() -> Option<PathBuf> {
    if have("vng") {
        return Some(PathBuf::from("vng"));
    }
    let mut scripts = Command::new("python3");
    scripts.args(["-c", "import sysconfig; print(sysconfig.get_path('scripts'))"]);
    let dir = output(scripts).ok()?;
    let path = Path::new(dir.trim()).join("vng");
    path.is_file().then_some(path)
}

fn apt_update() -> Result<()> {
    let mut update = Command::new("apt-get");
    update.args(["update", "-qq"]);
    run(update)
}

/// Makes sure the kernel is downloaded, unpacked and its modules installed.
pub(crate) fn ensure_kernel() -> Result<Kernel> {
    let cache = target_dir().join("vm/kernel");
    fs::create_dir_all(&cache)?;
    let package = match std::env::var("KUBE_IPVS_KERNEL_PACKAGE") {
        Ok(package) => package,
        Err(_) => cached_or_resolved_package(&cache)?,
    };
    let root = cache.join(&package);
    if find_image(&root).is_err() {
        download(&cache, &package, &root)?;
    }
    let (image, release) = find_image(&root)?;
    install_modules(&root, &release)?;
    Ok(Kernel { image, release })
}

/// The package recorded by an earlier run, or the one `linux-image-amd64` depends on now.
fn cached_or_resolved_package(cache: &Path) -> Result<String> {
    let record = cache.join("package");
    if let Ok(package) = fs::read_to_string(&record) {
        let package = package.trim().to_owned();
        if find_image(&cache.join(&package)).is_ok() {
            return Ok(package);
        }
    }
    let resolve = || -> Result<String> {
        let mut depends = Command::new("apt-cache");
        depends.args(["depends", KERNEL_META_PACKAGE]);
        output(depends)?
            .lines()
            .filter_map(|line| line.trim().strip_prefix("Depends: "))
            .find(|name| name.starts_with("linux-image-") && name.ends_with("-amd64"))
            .map(str::to_owned)
            .with_context(|| format!("{KERNEL_META_PACKAGE} names no kernel image"))
    };
    let package = match resolve() {
        Ok(package) => package,
        Err(_) => {
            // A fresh machine has no package lists yet.
            apt_update()?;
            resolve()?
        }
    };
    fs::write(&record, &package)?;
    Ok(package)
}

fn download(cache: &Path, package: &str, root: &Path) -> Result<()> {
    eprintln!("xtask: downloading kernel package {package} (cached under {})", cache.display());
    let downloads = cache.join("downloads");
    fs::create_dir_all(&downloads)?;
    let mut get = Command::new("apt-get");
    get.args(["download", "-qq", package]).current_dir(&downloads);
    run(get)?;
    let deb = fs::read_dir(&downloads)?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .find(|path| {
            path.file_name().and_then(|name| name.to_str()).is_some_and(|name| {
                name.starts_with(&format!("{package}_")) && name.ends_with(".deb")
            })
        })
        .with_context(|| format!("apt-get download left no {package} .deb"))?;
    let unpacking = cache.join(format!("{package}.unpacking"));
    let _ = fs::remove_dir_all(&unpacking);
    let mut extract = Command::new("dpkg-deb");
    extract.arg("-x").arg(&deb).arg(&unpacking);
    run(extract)?;
    fs::rename(&unpacking, root)?;
    fs::remove_file(&deb)?;
    Ok(())
}

fn find_image(root: &Path) -> Result<(PathBuf, String)> {
    let boot = root.join("boot");
    let entries = fs::read_dir(&boot).with_context(|| format!("no {}", boot.display()))?;
    for entry in entries {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_owned();
        if let Some(release) = name.strip_prefix("vmlinuz-") {
            return Ok((path.clone(), release.to_owned()));
        }
    }
    bail!("no vmlinuz in {}", boot.display())
}

/// virtme-ng gives the guest the host's `/lib/modules/<release>`: link the unpacked modules
/// there and index them.
fn install_modules(root: &Path, release: &str) -> Result<()> {
    let modules = root.join("lib/modules").join(release);
    let link = Path::new("/lib/modules").join(release);
    let current = fs::read_link(&link).ok();
    if current.as_deref() != Some(modules.as_path()) {
        if link.exists() && current.is_none() {
            bail!("{} exists and is not ours; remove it or pick another kernel", link.display());
        }
        fs::create_dir_all("/lib/modules")?;
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(&modules, &link)
            .with_context(|| format!("cannot link {} (are you root?)", link.display()))?;
    }
    if !modules.join("modules.dep").exists() {
        let mut depmod = Command::new("depmod");
        depmod.args(["-a", release]);
        run(depmod)?;
    }
    Ok(())
}

//! Kernel modules: finding them in an unpacked module tree, reading their
//! dependencies from the `.modinfo` ELF section, and ordering them so that
//! every module is loaded after the modules it depends on.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ModuleError {
    #[error("module {0} is not in {1}")]
    NotFound(String, PathBuf),
    #[error("module dependency cycle through {0}")]
    Cycle(String),
    #[error("{0}: not a 64-bit little-endian ELF module: {1}")]
    BadElf(PathBuf, &'static str),
    #[error("reading {0}: {1}")]
    Io(PathBuf, std::io::Error),
}

/// Module names use '-' and '_' interchangeably.
pub fn normalize(name: &str) -> String {
    name.trim_end_matches(".ko").replace('-', "_")
}

fn u16_at(b: &[u8], o: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(o..o + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], o: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], o: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(o..o + 8)?.try_into().ok()?))
}

/// Returns the contents of the ELF section called `name`.
pub fn elf_section<'a>(elf: &'a [u8], name: &str) -> Result<Option<&'a [u8]>, &'static str> {
    if elf.get(0..4) != Some(b"\x7fELF") {
        return Err("no ELF magic");
    }
    if elf.get(4) != Some(&2) || elf.get(5) != Some(&1) {
        return Err("not ELF64 little-endian");
    }
    let shoff = u64_at(elf, 0x28).ok_or("short header")? as usize;
    let shentsize = u16_at(elf, 0x3a).ok_or("short header")? as usize;
    let shnum = u16_at(elf, 0x3c).ok_or("short header")? as usize;
    let shstrndx = u16_at(elf, 0x3e).ok_or("short header")? as usize;
    if shentsize < 64 || shstrndx >= shnum {
        return Err("bad section header table");
    }
    let section = |i: usize| -> Result<(u32, usize, usize), &'static str> {
        let base = shoff
            .checked_add(i.checked_mul(shentsize).ok_or("overflow")?)
            .ok_or("overflow")?;
        let name = u32_at(elf, base).ok_or("section header out of file")?;
        let offset = u64_at(elf, base + 0x18).ok_or("section header out of file")? as usize;
        let size = u64_at(elf, base + 0x20).ok_or("section header out of file")? as usize;
        Ok((name, offset, size))
    };
    let (_, str_off, str_size) = section(shstrndx)?;
    let strtab = elf
        .get(str_off..str_off.checked_add(str_size).ok_or("overflow")?)
        .ok_or("string table out of file")?;
    for i in 0..shnum {
        let (name_off, off, size) = section(i)?;
        let Some(rest) = strtab.get(name_off as usize..) else {
            continue;
        };
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        if &rest[..end] == name.as_bytes() {
            let data = elf
                .get(off..off.checked_add(size).ok_or("overflow")?)
                .ok_or("section out of file")?;
            return Ok(Some(data));
        }
    }
    Ok(None)
}

/// The `depends=` list of a module's `.modinfo`.
pub fn module_depends(elf: &[u8]) -> Result<Vec<String>, &'static str> {
    let Some(modinfo) = elf_section(elf, ".modinfo")? else {
        return Ok(Vec::new());
    };
    for entry in modinfo.split(|&b| b == 0) {
        if let Some(v) = entry.strip_prefix(b"depends=") {
            return Ok(String::from_utf8_lossy(v)
                .split(',')
                .filter(|s| !s.is_empty())
                .map(normalize)
                .collect());
        }
    }
    Ok(Vec::new())
}

/// The `.ko` files of one kernel's module tree, by module name, and the
/// names of the modules built into that kernel (`modules.builtin`).
#[derive(Debug)]
pub struct ModuleTree {
    root: PathBuf,
    by_name: BTreeMap<String, PathBuf>,
    builtin: BTreeSet<String>,
}

/// A resolved set of modules: load order and each module's direct
/// dependencies.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resolved {
    /// Every module, each after all of its dependencies.
    pub order: Vec<String>,
    /// Direct dependencies (`depends=` of `.modinfo`), by module.
    pub depends: BTreeMap<String, Vec<String>>,
    /// Requested modules that are built into the kernel, so not loaded.
    pub builtin: Vec<String>,
}

impl Resolved {
    /// Every module `name` needs, directly or not, in `modules.dep` order:
    /// the last one is loaded first.
    pub fn transitive(&self, name: &str) -> Vec<String> {
        let mut seen = BTreeSet::new();
        let mut stack: Vec<&str> = self
            .depends
            .get(name)
            .map(|d| d.iter().map(String::as_str).collect())
            .unwrap_or_default();
        while let Some(d) = stack.pop() {
            if seen.insert(d.to_owned()) {
                if let Some(more) = self.depends.get(d) {
                    stack.extend(more.iter().map(String::as_str));
                }
            }
        }
        let pos = |n: &String| self.order.iter().position(|o| o == n);
        let mut deps: Vec<String> = seen.into_iter().collect();
        deps.sort_by_key(|d| std::cmp::Reverse(pos(d)));
        deps
    }
}

impl ModuleTree {
    /// Indexes `root` (e.g. `build/kernel/modules/<release>`).
    pub fn open(root: &Path) -> Result<Self, ModuleError> {
        let mut by_name = BTreeMap::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(dir) = stack.pop() {
            let rd = std::fs::read_dir(&dir).map_err(|e| ModuleError::Io(dir.clone(), e))?;
            for entry in rd {
                let entry = entry.map_err(|e| ModuleError::Io(dir.clone(), e))?;
                let path = entry.path();
                if path.is_dir() {
                    stack.push(path);
                } else if let Some(name) = path.file_name().and_then(|n| n.to_str()) {
                    if let Some(stem) = name.strip_suffix(".ko") {
                        let rel = path.strip_prefix(root).unwrap_or(&path).to_path_buf();
                        by_name.insert(normalize(stem), rel);
                    }
                }
            }
        }
        // `kernel/fs/ext4/ext4.ko` per line: modules compiled into the kernel.
        let builtin = std::fs::read_to_string(root.join("modules.builtin"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().rsplit('/').next())
            .filter(|n| !n.is_empty())
            .map(normalize)
            .collect();
        Ok(Self {
            root: root.to_path_buf(),
            by_name,
            builtin,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Whether `name` is compiled into the kernel (and has no `.ko`).
    pub fn is_builtin(&self, name: &str) -> bool {
        let n = normalize(name);
        self.builtin.contains(&n) && !self.by_name.contains_key(&n)
    }

    /// Path of module `name`, relative to the tree's root.
    pub fn path_of(&self, name: &str) -> Result<&Path, ModuleError> {
        self.by_name
            .get(&normalize(name))
            .map(|p| p.as_path())
            .ok_or_else(|| ModuleError::NotFound(name.to_owned(), self.root.clone()))
    }

    fn depends_of(&self, name: &str) -> Result<Vec<String>, ModuleError> {
        let path = self.root.join(self.path_of(name)?);
        let data = std::fs::read(&path).map_err(|e| ModuleError::Io(path.clone(), e))?;
        module_depends(&data).map_err(|why| ModuleError::BadElf(path, why))
    }

    /// `wanted` and everything they depend on, dependencies first.
    /// Built-in modules are skipped.
    pub fn load_order(&self, wanted: &[&str]) -> Result<Vec<String>, ModuleError> {
        Ok(self.resolve(wanted)?.order)
    }

    /// Like [`Self::load_order`], keeping the dependency graph.
    pub fn resolve(&self, wanted: &[&str]) -> Result<Resolved, ModuleError> {
        let (builtin, loadable): (Vec<&str>, Vec<&str>) =
            wanted.iter().partition(|w| self.is_builtin(w));
        let mut depends = BTreeMap::new();
        let order = resolve(&loadable, |n| {
            let d = self.depends_of(n)?;
            depends.insert(n.to_owned(), d.clone());
            Ok(d)
        })?;
        Ok(Resolved {
            order,
            depends,
            builtin: builtin.into_iter().map(normalize).collect(),
        })
    }

    /// A `modules.dep` for the resolved modules, paths relative to the tree.
    pub fn modules_dep(&self, resolved: &Resolved) -> Result<String, ModuleError> {
        let mut out = String::new();
        for name in &resolved.order {
            out.push_str(&self.path_of(name)?.to_string_lossy());
            out.push(':');
            for dep in resolved.transitive(name) {
                out.push(' ');
                out.push_str(&self.path_of(&dep)?.to_string_lossy());
            }
            out.push('\n');
        }
        Ok(out)
    }
}

/// Depth-first topological order over a dependency function.
pub fn resolve<F>(wanted: &[&str], mut depends: F) -> Result<Vec<String>, ModuleError>
where
    F: FnMut(&str) -> Result<Vec<String>, ModuleError>,
{
    #[derive(PartialEq)]
    enum State {
        Visiting,
        Done,
    }
    fn visit<F>(
        name: &str,
        depends: &mut F,
        state: &mut HashMap<String, State>,
        order: &mut Vec<String>,
    ) -> Result<(), ModuleError>
    where
        F: FnMut(&str) -> Result<Vec<String>, ModuleError>,
    {
        match state.get(name) {
            Some(State::Done) => return Ok(()),
            Some(State::Visiting) => return Err(ModuleError::Cycle(name.to_owned())),
            None => {}
        }
        state.insert(name.to_owned(), State::Visiting);
        for dep in depends(name)? {
            visit(&dep, depends, state, order)?;
        }
        state.insert(name.to_owned(), State::Done);
        order.push(name.to_owned());
        Ok(())
    }
    let mut state = HashMap::new();
    let mut order = Vec::new();
    for w in wanted {
        visit(&normalize(w), &mut depends, &mut state, &mut order)?;
    }
    Ok(order)
}

/// A minimal ELF64 with a section-name table and one `.modinfo` section
/// holding `modinfo` (NUL-separated `key=value` strings): a stand-in for a
/// `.ko` in tests.
pub fn synthetic_module(modinfo: &[u8]) -> Vec<u8> {
    let shstr = b"\0.shstrtab\0.modinfo\0";
    let mut elf = vec![0u8; 64];
    elf[0..4].copy_from_slice(b"\x7fELF");
    elf[4] = 2;
    elf[5] = 1;
    let shstr_off = elf.len();
    elf.extend_from_slice(shstr);
    let modinfo_off = elf.len();
    elf.extend_from_slice(modinfo);
    while elf.len() % 8 != 0 {
        elf.push(0);
    }
    let shoff = elf.len();
    let mut sh = |name: u32, off: usize, size: usize| {
        let mut s = vec![0u8; 64];
        s[0..4].copy_from_slice(&name.to_le_bytes());
        s[0x18..0x20].copy_from_slice(&(off as u64).to_le_bytes());
        s[0x20..0x28].copy_from_slice(&(size as u64).to_le_bytes());
        elf.extend_from_slice(&s);
    };
    sh(0, 0, 0);
    sh(1, shstr_off, shstr.len());
    sh(11, modinfo_off, modinfo.len());
    elf[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
    elf[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
    elf[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
    elf[0x3e..0x40].copy_from_slice(&1u16.to_le_bytes());
    elf
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub use super::synthetic_module as fake_module;

    #[test]
    fn reads_depends_from_modinfo() {
        let m = fake_module(b"license=GPL\0depends=kvm,irq-bypass\0name=kvm_amd\0");
        assert_eq!(module_depends(&m).unwrap(), ["kvm", "irq_bypass"]);
        let none = fake_module(b"depends=\0");
        assert!(module_depends(&none).unwrap().is_empty());
    }

    #[test]
    fn hostile_elf_is_an_error_not_a_panic() {
        assert!(module_depends(b"not elf").is_err());
        let mut m = fake_module(b"depends=a\0");
        m[0x28..0x30].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(module_depends(&m).is_err());
        let mut m = fake_module(b"depends=a\0");
        m.truncate(100);
        assert!(module_depends(&m).is_err());
    }

    #[test]
    fn order_puts_dependencies_first_once() {
        let deps = |n: &str| -> Result<Vec<String>, ModuleError> {
            Ok(match n {
                "kvm_amd" => vec!["kvm".into()],
                "kvm" => vec!["irqbypass".into()],
                "virtio_blk" => vec![],
                _ => vec![],
            })
        };
        let o = resolve(&["kvm-amd", "virtio_blk", "kvm"], deps).unwrap();
        assert_eq!(o, ["irqbypass", "kvm", "kvm_amd", "virtio_blk"]);
    }

    #[test]
    fn cycles_and_missing_modules_are_errors() {
        let deps = |n: &str| -> Result<Vec<String>, ModuleError> {
            Ok(match n {
                "a" => vec!["b".into()],
                "b" => vec!["a".into()],
                _ => vec![],
            })
        };
        assert!(matches!(resolve(&["a"], deps), Err(ModuleError::Cycle(_))));
        let dir = std::env::temp_dir().join(format!("cwkvm-mods-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("kernel/x")).unwrap();
        std::fs::write(
            dir.join("kernel/x/virtio-rng.ko"),
            fake_module(b"depends=\0"),
        )
        .unwrap();
        let tree = ModuleTree::open(&dir).unwrap();
        assert_eq!(
            tree.path_of("virtio_rng").unwrap(),
            Path::new("kernel/x/virtio-rng.ko")
        );
        assert!(matches!(
            tree.load_order(&["nope"]),
            Err(ModuleError::NotFound(..))
        ));
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn fake_tree(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("cwkvm-tree-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for (path, deps) in [
            ("kernel/virt/lib/irqbypass.ko", ""),
            ("kernel/arch/x86/kvm/kvm.ko", "irqbypass"),
            ("kernel/arch/x86/kvm/kvm-amd.ko", "kvm"),
            ("kernel/drivers/block/virtio_blk.ko", ""),
            ("kernel/net/a.ko", "b"),
            ("kernel/net/b.ko", "c"),
            ("kernel/net/c.ko", "a"),
            ("kernel/net/d.ko", "missing_one"),
        ] {
            let f = dir.join(path);
            std::fs::create_dir_all(f.parent().unwrap()).unwrap();
            let modinfo = format!("license=GPL\0depends={deps}\0");
            std::fs::write(f, fake_module(modinfo.as_bytes())).unwrap();
        }
        std::fs::write(
            dir.join("modules.builtin"),
            "kernel/drivers/virtio/virtio_pci.ko\nkernel/fs/ext4/ext4.ko\n",
        )
        .unwrap();
        dir
    }

    #[test]
    fn tree_resolves_transitively_and_writes_modules_dep() {
        let dir = fake_tree("dep");
        let tree = ModuleTree::open(&dir).unwrap();
        let r = tree
            .resolve(&["kvm-amd", "virtio_pci", "virtio_blk"])
            .unwrap();
        assert_eq!(r.order, ["irqbypass", "kvm", "kvm_amd", "virtio_blk"]);
        assert_eq!(r.builtin, ["virtio_pci"], "built-in modules are not loaded");
        assert_eq!(r.transitive("kvm_amd"), ["kvm", "irqbypass"]);
        assert_eq!(
            tree.modules_dep(&r).unwrap(),
            "kernel/virt/lib/irqbypass.ko:\n\
             kernel/arch/x86/kvm/kvm.ko: kernel/virt/lib/irqbypass.ko\n\
             kernel/arch/x86/kvm/kvm-amd.ko: kernel/arch/x86/kvm/kvm.ko kernel/virt/lib/irqbypass.ko\n\
             kernel/drivers/block/virtio_blk.ko:\n"
        );
        // A cycle among real files, and a dependency the tree lacks.
        assert!(matches!(tree.resolve(&["a"]), Err(ModuleError::Cycle(_))));
        match tree.resolve(&["d"]) {
            Err(ModuleError::NotFound(n, _)) => assert_eq!(n, "missing_one"),
            other => panic!("expected NotFound, got {other:?}"),
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// The real Debian modules, when `make kernel` has run: kvm-amd needs
    /// kvm which needs irqbypass.
    #[test]
    fn debian_kvm_amd_depends_on_kvm_and_irqbypass() {
        let kdir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../build/kernel");
        let Some(release) = std::fs::read_to_string(kdir.join("version"))
            .ok()
            .and_then(|v| {
                v.lines()
                    .find_map(|l| l.strip_prefix("release=").map(str::to_owned))
            })
        else {
            coworkvm_tests::skip_or_fail("build/kernel not fetched (make kernel)");
            return;
        };
        let tree = ModuleTree::open(&kdir.join("modules").join(release)).unwrap();
        let order = tree.load_order(&["kvm_amd"]).unwrap();
        assert_eq!(order, ["irqbypass", "kvm", "kvm_amd"]);
        let vsock = tree.load_order(&["vmw_vsock_virtio_transport"]).unwrap();
        assert_eq!(vsock.last().unwrap(), "vmw_vsock_virtio_transport");
        let pos = |n: &str| vsock.iter().position(|m| m == n).unwrap();
        assert!(pos("vsock") < pos("vmw_vsock_virtio_transport_common"));
    }
}

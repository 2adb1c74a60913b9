//! A simulated disk with the failure modes that matter to the spool: data written but not
//! fdatasynced may be lost, kept, torn at sector granularity, or corrupted when the machine
//! crashes; directory changes (create, rename, remove) not followed by a directory sync may be
//! lost, a later one never surviving without the earlier ones.

use std::collections::BTreeMap;

use crate::rng::SimRng;

/// The unit a torn write tears at.
pub const SECTOR_BYTES: usize = 512;

#[derive(Debug, Clone, Default)]
struct Inode {
    /// What reads see now.
    data: Vec<u8>,
    /// What survives a crash for sure.
    durable: Vec<u8>,
    /// Writes since the last fdatasync, in order.
    pending: Vec<(usize, Vec<u8>)>,
}

#[derive(Debug, Clone)]
enum DirOp {
    Link { name: String, ino: u64 },
    Rename { from: String, to: String },
    Remove { name: String },
}

/// How a crash treats each unsynced write, in percent (the rest are lost).
#[derive(Debug, Clone, Copy)]
pub struct CrashModel {
    pub kept_pct: u64,
    pub torn_pct: u64,
    pub corrupt_pct: u64,
}

impl CrashModel {
    pub const DEFAULT: CrashModel = CrashModel {
        kept_pct: 40,
        torn_pct: 20,
        corrupt_pct: 10,
    };
}

#[derive(Debug, Clone, Default)]
pub struct SimDisk {
    inodes: BTreeMap<u64, Inode>,
    next_ino: u64,
    names: BTreeMap<String, u64>,
    durable_names: BTreeMap<String, u64>,
    dir_ops: Vec<DirOp>,
}

impl SimDisk {
    pub fn new() -> SimDisk {
        SimDisk::default()
    }

    fn ino(&self, name: &str) -> u64 {
        *self.names.get(name).unwrap_or_else(|| panic!("no file {name}"))
    }

    pub fn exists(&self, name: &str) -> bool {
        self.names.contains_key(name)
    }

    /// A new zero-filled file of `len` bytes (its zeros need an fdatasync to be durable, its
    /// name a directory sync).
    pub fn create(&mut self, name: &str, len: usize) {
        assert!(!self.names.contains_key(name), "{name} exists");
        let ino = self.next_ino;
        self.next_ino += 1;
        self.inodes.insert(
            ino,
            Inode {
                data: vec![0; len],
                durable: Vec::new(),
                pending: vec![(0, vec![0; len])],
            },
        );
        self.names.insert(name.to_string(), ino);
        self.dir_ops.push(DirOp::Link {
            name: name.to_string(),
            ino,
        });
    }

    pub fn write(&mut self, name: &str, offset: usize, bytes: &[u8]) {
        let ino = self.ino(name);
        let inode = self.inodes.get_mut(&ino).expect("inode");
        assert!(
            offset + bytes.len() <= inode.data.len(),
            "writes stay inside pre-written files"
        );
        inode.data[offset..offset + bytes.len()].copy_from_slice(bytes);
        inode.pending.push((offset, bytes.to_vec()));
    }

    pub fn fdatasync(&mut self, name: &str) {
        let ino = self.ino(name);
        let inode = self.inodes.get_mut(&ino).expect("inode");
        inode.durable = inode.data.clone();
        inode.pending.clear();
    }

    pub fn rename(&mut self, from: &str, to: &str) {
        let ino = self.names.remove(from).unwrap_or_else(|| panic!("no file {from}"));
        self.names.insert(to.to_string(), ino);
        self.dir_ops.push(DirOp::Rename {
            from: from.to_string(),
            to: to.to_string(),
        });
    }

    pub fn remove(&mut self, name: &str) {
        self.names.remove(name);
        self.dir_ops.push(DirOp::Remove { name: name.to_string() });
    }

    pub fn dir_sync(&mut self) {
        self.durable_names = self.names.clone();
        self.dir_ops.clear();
    }

    pub fn read(&self, name: &str) -> &[u8] {
        &self.inodes[&self.ino(name)].data
    }

    pub fn list(&self) -> Vec<String> {
        self.names.keys().cloned().collect()
    }

    /// Unsynced writes in all files (for the window measures).
    pub fn unsynced_writes(&self) -> usize {
        self.inodes.values().map(|i| i.pending.len()).sum()
    }

    /// The disk after a crash: durable data and names, plus what chance lets through.
    pub fn crash(&self, rng: &mut SimRng, model: CrashModel) -> SimDisk {
        let mut names = self.durable_names.clone();
        // A prefix of the directory changes since the last sync reached the disk.
        let applied = rng.below(self.dir_ops.len() as u64 + 1) as usize;
        for op in &self.dir_ops[..applied] {
            match op {
                DirOp::Link { name, ino } => {
                    names.insert(name.clone(), *ino);
                }
                DirOp::Rename { from, to } => {
                    if let Some(ino) = names.remove(from) {
                        names.insert(to.clone(), ino);
                    }
                }
                DirOp::Remove { name } => {
                    names.remove(name);
                }
            }
        }
        let mut inodes = BTreeMap::new();
        for (&ino, inode) in &self.inodes {
            if !names.values().any(|&i| i == ino) {
                continue;
            }
            let mut data = inode.durable.clone();
            data.resize(inode.data.len(), 0);
            for (offset, bytes) in &inode.pending {
                let roll = rng.below(100);
                let m = model;
                if roll < m.kept_pct {
                    data[*offset..offset + bytes.len()].copy_from_slice(bytes);
                } else if roll < m.kept_pct + m.torn_pct {
                    for (i, sector) in bytes.chunks(SECTOR_BYTES).enumerate() {
                        if rng.below(2) == 0 {
                            let at = offset + i * SECTOR_BYTES;
                            data[at..at + sector.len()].copy_from_slice(sector);
                        }
                    }
                } else if roll < m.kept_pct + m.torn_pct + m.corrupt_pct {
                    data[*offset..offset + bytes.len()].copy_from_slice(bytes);
                    let flip = offset + rng.below(bytes.len() as u64) as usize;
                    data[flip] ^= 1 << rng.below(8);
                }
            }
            inodes.insert(
                ino,
                Inode {
                    durable: data.clone(),
                    data,
                    pending: Vec::new(),
                },
            );
        }
        SimDisk {
            inodes,
            next_ino: self.next_ino,
            durable_names: names.clone(),
            names,
            dir_ops: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synced_data_and_names_survive_and_unsynced_ones_may_not() {
        let mut rng = SimRng::new(7);
        let mut disk = SimDisk::new();
        disk.create("a", 4096);
        disk.write("a", 0, &[1; 4096]);
        disk.fdatasync("a");
        disk.dir_sync();
        disk.write("a", 0, &[2; 4096]);
        disk.create("b", 512);
        let lost = disk.crash(
            &mut rng,
            CrashModel {
                kept_pct: 0,
                torn_pct: 0,
                corrupt_pct: 0,
            },
        );
        assert_eq!(lost.read("a"), &[1; 4096][..]);
        let kept = disk.crash(
            &mut rng,
            CrashModel {
                kept_pct: 100,
                torn_pct: 0,
                corrupt_pct: 0,
            },
        );
        assert_eq!(kept.read("a"), &[2; 4096][..]);
        let mut seen_torn = false;
        for _ in 0..20 {
            let torn = disk.crash(
                &mut rng,
                CrashModel {
                    kept_pct: 0,
                    torn_pct: 100,
                    corrupt_pct: 0,
                },
            );
            let twos = torn.read("a").iter().filter(|&&b| b == 2).count();
            assert_eq!(twos % SECTOR_BYTES, 0, "tears fall on sector boundaries");
            seen_torn |= twos > 0 && twos < 4096;
        }
        assert!(seen_torn);
    }
}

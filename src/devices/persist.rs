//! Saving and restoring devices, one symmetric pair per device.
//!
//! A device implements [`Persist`]: `save` gives its state as a serde
//! struct, `restore` builds it from its constructor arguments and a saved
//! state (or none, for a fresh device); a device with I/O of its own also
//! says how it stops taking requests and starts again (`quiesce`,
//! `resume`). The [`Registry`] keeps every device of a VM by type and id
//! (a VM may have several disks), quiesces, resumes and saves them all for
//! the VM (it is the VM's `DeviceControl`), and checks on a restore that
//! every saved device found its device, so that a checkpoint of a VM with
//! a device is never restored without it. Adding a device is one
//! `Persist` impl and one `Registry::build` line where the set is built.

use std::collections::BTreeSet;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::DeviceError;
use crate::vmm::bus::{DeviceControl, DeviceError as ControlError};
use crate::vmm::state::DeviceStates;
use crate::vmm::store::BlockStore;

/// A device whose state travels with checkpoints and migrations.
pub trait Persist: Sized {
    /// The device type: the outer key of its saved state.
    const TYPE: &'static str;
    /// What it saves.
    type State: Serialize + DeserializeOwned;
    /// What building it needs besides its state (eventfds, files, outputs).
    type Args;
    /// Its state now; called with the vCPUs paused and the device quiesced.
    fn save(&self) -> Result<Self::State, DeviceError>;
    /// The device from `args`, as it was in `state` (None: fresh).
    fn restore(args: Self::Args, state: Option<&Self::State>) -> Result<Self, DeviceError>;
    /// Stops taking requests and finishes those in flight (the vCPUs may
    /// still run); a device that does no I/O of its own has nothing to do.
    fn quiesce(&self) -> Result<(), DeviceError> {
        Ok(())
    }
    /// Serves again after `quiesce` or a restore.
    fn resume(&self) -> Result<(), DeviceError> {
        Ok(())
    }
    /// What it reports for `status` (None: nothing).
    fn status(&self) -> Option<crate::api::vm::DeviceStatus> {
        None
    }
    /// The VM now runs on another host: tell the network where it is (a
    /// network card announces its MAC). One round of several.
    fn announce(&self) {}
    /// Whether [`Persist::load`] is implemented: a device that cannot go
    /// back to a saved state in place makes a reset refuse the VM.
    const LOADS_IN_PLACE: bool = false;
    /// Goes back to `state` in place (a reset; quiesced, vCPUs paused).
    fn load(&self, state: &Self::State) -> Result<(), DeviceError> {
        let _ = state;
        Err(DeviceError::NoLoad {
            device: Self::TYPE.to_string(),
        })
    }
}

/// Reads a device's saved state as its own type.
fn state_of<D: Persist>(id: &str, v: &serde_json::Value) -> Result<D::State, DeviceError> {
    serde_json::from_value::<D::State>(v.clone()).map_err(|e| DeviceError::State {
        device: format!("{}/{id}", D::TYPE),
        reason: e.to_string(),
    })
}

/// One registered device, seen through closures over its `Persist` impl.
struct Entry {
    kind: &'static str,
    id: String,
    save: Box<
        dyn Fn() -> Result<serde_json::Value, Box<dyn std::error::Error + Send + Sync>>
            + Send
            + Sync,
    >,
    quiesce: Box<dyn Fn() -> Result<(), DeviceError> + Send + Sync>,
    resume: Box<dyn Fn() -> Result<(), DeviceError> + Send + Sync>,
    status: Box<dyn Fn() -> Option<crate::api::vm::DeviceStatus> + Send + Sync>,
    announce: Box<dyn Fn() + Send + Sync>,
    /// Loads a saved state in place; with `false`, only checks it would.
    load: LoadFn,
}

/// Loads a device's saved state in place (`true`), or only checks it would.
type LoadFn = Box<dyn Fn(&serde_json::Value, bool) -> Result<(), DeviceError> + Send + Sync>;

/// Every device of one VM, by type and id.
#[derive(Default)]
pub struct Registry {
    entries: Vec<Entry>,
    /// The disks, in the order they were built (the configuration's).
    stores: Vec<Arc<dyn BlockStore>>,
    /// Saved states the restore asked for.
    taken: BTreeSet<(String, String)>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut l = f.debug_list();
        for e in &self.entries {
            l.entry(&format_args!("{}/{}", e.kind, e.id));
        }
        l.finish()
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Registry {
        Registry::default()
    }

    /// Builds device `D` called `id`, from its state in `saved` if there is
    /// one there, and registers it.
    pub fn build<D: Persist + Send + Sync + 'static>(
        &mut self,
        id: &str,
        args: D::Args,
        saved: &DeviceStates,
    ) -> Result<Arc<D>, DeviceError> {
        let state = match saved.get(D::TYPE).and_then(|ids| ids.get(id)) {
            Some(v) => {
                self.taken.insert((D::TYPE.to_string(), id.to_string()));
                Some(state_of::<D>(id, v)?)
            }
            None => None,
        };
        let d = Arc::new(D::restore(args, state.as_ref())?);
        self.add(id, d.clone());
        Ok(d)
    }

    /// Registers a device built elsewhere.
    pub fn add<D: Persist + Send + Sync + 'static>(&mut self, id: &str, device: Arc<D>) {
        let (d1, d2, d3, d4, d5) = (
            device.clone(),
            device.clone(),
            device.clone(),
            device.clone(),
            device.clone(),
        );
        let id_owned = id.to_string();
        self.entries.push(Entry {
            kind: D::TYPE,
            id: id.to_string(),
            save: Box::new(move || {
                let s = d1.save()?;
                Ok(serde_json::to_value(s)?)
            }),
            quiesce: Box::new(move || d2.quiesce()),
            resume: Box::new(move || d3.resume()),
            status: Box::new(move || d4.status()),
            announce: Box::new(move || device.announce()),
            load: Box::new(move |v, apply| {
                if !D::LOADS_IN_PLACE {
                    return Err(DeviceError::NoLoad {
                        device: format!("{}/{id_owned}", D::TYPE),
                    });
                }
                let s = state_of::<D>(&id_owned, v)?;
                if apply {
                    d5.load(&s)?;
                }
                Ok(())
            }),
        });
    }

    /// Registers a disk the transfer engine moves (after its device).
    pub fn add_store(&mut self, store: Arc<dyn BlockStore>) {
        self.stores.push(store);
    }

    /// Fails if `saved` holds a device this registry did not build: the
    /// saved VM had a device this one lacks.
    pub fn check_all_restored(&self, saved: &DeviceStates) -> Result<(), DeviceError> {
        for (t, ids) in saved {
            for id in ids.keys() {
                if !self.taken.contains(&(t.clone(), id.clone())) {
                    return Err(DeviceError::Missing {
                        device: format!("{t}/{id}"),
                    });
                }
            }
        }
        Ok(())
    }
}

impl Registry {
    /// Checks (and with `apply`, loads) every device's state in `saved`.
    fn load_all(&self, saved: &DeviceStates, apply: bool) -> Result<(), ControlError> {
        let err = |device: String, e: DeviceError| ControlError {
            action: "load",
            device,
            source: Box::new(e),
        };
        for (t, ids) in saved {
            for id in ids.keys() {
                if !self.entries.iter().any(|e| e.kind == t && &e.id == id) {
                    let device = format!("{t}/{id}");
                    return Err(err(device.clone(), DeviceError::Missing { device }));
                }
            }
        }
        for e in &self.entries {
            let device = format!("{}/{}", e.kind, e.id);
            let Some(v) = saved.get(e.kind).and_then(|ids| ids.get(&e.id)) else {
                return Err(err(
                    device.clone(),
                    DeviceError::State {
                        device,
                        reason: "the checkpoint holds no state for it".into(),
                    },
                ));
            };
            (e.load)(v, apply).map_err(|x| err(device, x))?;
        }
        Ok(())
    }
}

impl DeviceControl for Registry {
    fn quiesce(&self) -> Result<(), ControlError> {
        for e in &self.entries {
            (e.quiesce)().map_err(|err| ControlError {
                action: "quiesce",
                device: format!("{}/{}", e.kind, e.id),
                source: Box::new(err),
            })?;
        }
        Ok(())
    }

    fn resume(&self) -> Result<(), ControlError> {
        for e in &self.entries {
            (e.resume)().map_err(|err| ControlError {
                action: "resume",
                device: format!("{}/{}", e.kind, e.id),
                source: Box::new(err),
            })?;
        }
        Ok(())
    }

    fn status(&self) -> Vec<crate::api::vm::DeviceStatus> {
        self.entries.iter().filter_map(|e| (e.status)()).collect()
    }

    fn announce(&self) {
        for e in &self.entries {
            (e.announce)();
        }
    }

    fn check_load(&self, saved: &DeviceStates) -> Result<(), ControlError> {
        self.load_all(saved, false)
    }

    fn load(&self, saved: &DeviceStates) -> Result<(), ControlError> {
        self.load_all(saved, true)
    }

    fn stores(&self) -> Vec<Arc<dyn BlockStore>> {
        self.stores.clone()
    }

    fn save(&self) -> Result<DeviceStates, ControlError> {
        let mut out = DeviceStates::new();
        for e in &self.entries {
            let v = (e.save)().map_err(|source| ControlError {
                action: "save",
                device: format!("{}/{}", e.kind, e.id),
                source,
            })?;
            out.entry(e.kind.to_string())
                .or_default()
                .insert(e.id.clone(), v);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[derive(Default)]
    struct Counter(AtomicU32);

    impl Persist for Counter {
        const TYPE: &'static str = "counter";
        type State = u32;
        type Args = ();
        fn save(&self) -> Result<u32, DeviceError> {
            Ok(self.0.load(Ordering::Relaxed))
        }
        fn restore(_: (), state: Option<&u32>) -> Result<Counter, DeviceError> {
            Ok(Counter(AtomicU32::new(state.copied().unwrap_or(0))))
        }
    }

    #[test]
    fn devices_are_saved_by_type_and_id_and_come_back() {
        let mut r = Registry::new();
        let a = r.build::<Counter>("a", (), &DeviceStates::new()).unwrap();
        let b = r.build::<Counter>("b", (), &DeviceStates::new()).unwrap();
        a.0.store(3, Ordering::Relaxed);
        b.0.store(7, Ordering::Relaxed);
        let saved = r.save().unwrap();
        assert_eq!(saved["counter"]["a"], 3);
        assert_eq!(saved["counter"]["b"], 7);
        let mut r2 = Registry::new();
        let b2 = r2.build::<Counter>("b", (), &saved).unwrap();
        assert_eq!(b2.save().unwrap(), 7);
        let e = r2.check_all_restored(&saved).unwrap_err();
        assert!(e.to_string().contains("counter/a"), "{e}");
        r2.build::<Counter>("a", (), &saved).unwrap();
        r2.check_all_restored(&saved).unwrap();
    }

    #[test]
    fn a_state_of_the_wrong_shape_names_the_device() {
        let mut saved = DeviceStates::new();
        saved
            .entry("counter".into())
            .or_default()
            .insert("x".into(), serde_json::json!("seven"));
        let e = Registry::new()
            .build::<Counter>("x", (), &saved)
            .err()
            .expect("a string is not a u32");
        assert!(e.to_string().contains("counter/x"), "{e}");
    }
}

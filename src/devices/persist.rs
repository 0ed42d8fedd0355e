//! Saving and restoring devices, one symmetric pair per device.
//!
//! A device implements [`Persist`]: `save` gives its state as a serde
//! struct, `restore` builds it from its constructor arguments and a saved
//! state (or none, for a fresh device). The [`Registry`] keeps every
//! device of a VM by type and id (a VM may have several disks), saves
//! them all into the VM state's device map, and checks on a restore that
//! every saved device found its device, so that a checkpoint of a VM with
//! a device is never restored without it. Adding a device is one
//! `Persist` impl and one `Registry::add` line where the set is built.

use std::collections::BTreeSet;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::DeviceError;
use crate::vmm::bus::{DeviceSaveError, SaveDevices};
use crate::vmm::state::DeviceStates;

/// A device whose state travels with checkpoints and migrations.
pub trait Persist: Sized {
    /// The device type: the outer key of its saved state.
    const TYPE: &'static str;
    /// What it saves.
    type State: Serialize + DeserializeOwned;
    /// What building it needs besides its state (eventfds, files, outputs).
    type Args;
    /// Its state now; called with the vCPUs paused.
    fn save(&self) -> Self::State;
    /// The device from `args`, as it was in `state` (None: fresh).
    fn restore(args: Self::Args, state: Option<&Self::State>) -> Result<Self, DeviceError>;
}

type Saver = Box<dyn Fn() -> Result<serde_json::Value, serde_json::Error> + Send + Sync>;

/// Every device of one VM, by type and id.
#[derive(Default)]
pub struct Registry {
    savers: Vec<(&'static str, String, Saver)>,
    /// Saved states the restore asked for.
    taken: BTreeSet<(String, String)>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut l = f.debug_list();
        for (t, id, _) in &self.savers {
            l.entry(&format_args!("{t}/{id}"));
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
                Some(serde_json::from_value::<D::State>(v.clone()).map_err(|e| {
                    DeviceError::State {
                        device: format!("{}/{id}", D::TYPE),
                        reason: e.to_string(),
                    }
                })?)
            }
            None => None,
        };
        let d = Arc::new(D::restore(args, state.as_ref())?);
        self.add(id, d.clone());
        Ok(d)
    }

    /// Registers a device built elsewhere.
    pub fn add<D: Persist + Send + Sync + 'static>(&mut self, id: &str, device: Arc<D>) {
        self.savers.push((
            D::TYPE,
            id.to_string(),
            Box::new(move || serde_json::to_value(device.save())),
        ));
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

impl SaveDevices for Registry {
    fn save(&self) -> Result<DeviceStates, DeviceSaveError> {
        let mut out = DeviceStates::new();
        for (t, id, save) in &self.savers {
            let v = save().map_err(|source| DeviceSaveError {
                device: format!("{t}/{id}"),
                source,
            })?;
            out.entry(t.to_string()).or_default().insert(id.clone(), v);
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
        fn save(&self) -> u32 {
            self.0.load(Ordering::Relaxed)
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
        assert_eq!(b2.save(), 7);
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

//! What the CLI asks of its own process: the [`Local`] calls that need no
//! VM's API (running one is [`super::process::run`]).

use std::path::Path;

use crate::api::checkpoint::{ChainListing, CheckpointTarget, DropReport, MergeReport};
use crate::api::numa::{HostNodeReport, TopologyReport};
use crate::api::run::{Local, RunEnd, RunEvent, RunSpec};
use crate::api::ApiError;
use crate::checkpoint::chain::{self, Chain};
use crate::checkpoint::image;

/// The service as the CLI's [`Local`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Service;

impl Local for Service {
    fn run(&self, spec: RunSpec, events: &mut dyn FnMut(RunEvent)) -> Result<RunEnd, ApiError> {
        super::process::run(spec, events).map_err(|e| ApiError::from(&e))
    }

    fn topology(&self) -> Result<TopologyReport, ApiError> {
        let t = crate::host::topology::Topology::read().map_err(|e| ApiError::from(&e))?;
        Ok(TopologyReport {
            nodes: t
                .nodes
                .into_iter()
                .map(|n| HostNodeReport {
                    id: n.id,
                    cpus: n.cpus,
                    total_bytes: n.total_bytes,
                    free_bytes: n.free_bytes,
                    distances: n.distances,
                })
                .collect(),
        })
    }

    fn checkpoints(&self, dir: &Path) -> Result<ChainListing, ApiError> {
        let chain = Chain::open(dir).map_err(|e| ApiError::from(&e))?;
        Ok(ChainListing {
            dir: dir.to_path_buf(),
            checkpoints: chain.entries().to_vec(),
            damaged: chain.damaged().to_vec(),
        })
    }

    fn merge(&self, target: &CheckpointTarget) -> Result<MergeReport, ApiError> {
        let w = chain::merge(&target.dir, target.id).map_err(|e| ApiError::from(&e))?;
        Ok(MergeReport {
            operation: "merge".into(),
            id: w.id,
            path: w.path,
            bytes_written: w.bytes_written,
            pages_written: w.pages_written,
            disk_blocks: w.disk_blocks,
        })
    }

    fn delete(&self, target: &CheckpointTarget) -> Result<DropReport, ApiError> {
        let d = image::delete(&target.dir, target.id).map_err(|e| ApiError::from(&e))?;
        Ok(drop_report("delete", d))
    }

    fn drop_images(&self, dir: &Path) -> Result<DropReport, ApiError> {
        let d = image::drop_images(dir).map_err(|e| ApiError::from(&e))?;
        Ok(drop_report("drop-images", d))
    }

    fn linux_capable(&self) -> Result<(), ApiError> {
        crate::vmm::probe::linux_capable().map_err(|e| ApiError::from(&e))
    }
}

fn drop_report(operation: &str, d: image::Dropped) -> DropReport {
    DropReport {
        operation: operation.into(),
        file: d.file,
        images: d.images,
        image_bytes: d.image_bytes,
    }
}

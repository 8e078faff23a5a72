//! [`NcclGroup`]: a [`Communicator`] over NCCL (feature `nccl`), for ranks that are GPUs, in one process
//! or many. An exchange copies the bytes to the rank's device, all-gathers them there, and copies the
//! result back (which synchronizes the rank's stream): the vocabulary-parallel exchanges are a few bytes
//! per row. Lengths are all-gathered first, so ranks that disagree get an error instead of NCCL reading
//! past a buffer.

use std::sync::{Arc, Mutex};

use cudarc::driver::CudaStream;
use cudarc::nccl::{Comm, Id};

use super::{cuda_err, cuda_result, library_present};
use crate::loss::parallel::Communicator;
use crate::{Error, Result};

/// The names cudarc loads NCCL by (those of its list that exist on Linux). Not `libnccl.so.2`, the
/// soname NCCL ships (the nvidia-nccl-cu12 wheel has only that file): a `libnccl.so` link to it is needed.
const NCCL_LIBRARIES: &[&str] = &[
    "libnccl.so",
    "libnccl.so.12",
    "libnccl.so.11",
    "libnccl.so.1",
];

/// One rank of an NCCL group.
pub struct NcclGroup {
    // NCCL communicators are not thread-safe: every call holds the lock.
    comm: Mutex<Comm>,
    rank: usize,
    size: usize,
}

// SAFETY: a communicator is a handle NCCL lets any thread use as long as calls on it are not concurrent,
// which the mutex ensures; the stream it holds is cudarc's (Send + Sync).
unsafe impl Send for NcclGroup {}
// SAFETY: as above: every use goes through the mutex.
unsafe impl Sync for NcclGroup {}

fn nccl_err(e: impl std::fmt::Debug) -> Error {
    Error::Collective(format!("NCCL: {e:?}"))
}

/// Refuse to call NCCL when its library cannot be loaded (cudarc would panic).
fn probe() -> Result<()> {
    match library_present(NCCL_LIBRARIES) {
        true => Ok(()),
        false => Err(Error::NoDevice(
            "the NCCL library is not found as libnccl.so (the name cudarc loads): pip install \
             nvidia-nccl-cu12, link libnccl.so to its lib/libnccl.so.2, and put the link's directory \
             on LD_LIBRARY_PATH"
                .into(),
        )),
    }
}

impl NcclGroup {
    /// A new group's id, made by one rank (rank 0) and sent to the others by any means (its 128 bytes).
    pub fn unique_id() -> Result<[u8; 128]> {
        probe()?;
        let id = Id::new().map_err(nccl_err)?;
        Ok(id.internal().map(|c| c as u8))
    }

    /// This process's rank `rank` of a group of `size`, on `stream`'s device, joining the group `id`
    /// names ([`NcclGroup::unique_id`] on rank 0). Blocks until every rank has joined.
    pub fn from_rank(
        stream: Arc<CudaStream>,
        rank: usize,
        size: usize,
        id: [u8; 128],
    ) -> Result<Self> {
        probe()?;
        if rank >= size {
            return Err(Error::InvalidOption {
                name: "rank",
                reason: format!("rank {rank} of a group of {size}"),
            });
        }
        let id = Id::uninit(id.map(|b| b as std::ffi::c_char));
        let comm = Comm::from_rank(stream, rank, size, id).map_err(nccl_err)?;
        Ok(NcclGroup::new(comm))
    }

    /// One rank per stream (one GPU each) of this process; each rank is then used from its own thread.
    pub fn from_streams(streams: Vec<Arc<CudaStream>>) -> Result<Vec<Self>> {
        probe()?;
        if streams.is_empty() {
            return Err(Error::InvalidOption {
                name: "streams",
                reason: "a group needs at least one rank".into(),
            });
        }
        Ok(Comm::from_devices(streams)
            .map_err(nccl_err)?
            .into_iter()
            .map(NcclGroup::new)
            .collect())
    }

    /// A communicator the trainer already has.
    pub fn new(comm: Comm) -> Self {
        let (rank, size) = (comm.rank(), comm.world_size());
        NcclGroup {
            comm: Mutex::new(comm),
            rank,
            size,
        }
    }

    /// Every rank's `local` (of `len` elements on each), concatenated in rank order.
    fn gather<T: cudarc::nccl::NcclType + cudarc::driver::DeviceRepr + Copy>(
        comm: &Comm,
        local: &[T],
        size: usize,
    ) -> Result<Vec<T>> {
        let stream = comm.stream();
        if local.is_empty() {
            return Ok(Vec::new());
        }
        let send = cuda_result(stream.clone_htod(local))?;
        // SAFETY: NCCL writes all `size · len` elements before the copy back reads them.
        let mut recv = unsafe { stream.alloc::<T>(local.len() * size) }.map_err(cuda_err)?;
        comm.all_gather(&send, &mut recv).map_err(nccl_err)?;
        cuda_result(stream.clone_dtoh(&recv))
    }
}

impl Communicator for NcclGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_gather(&self, local: &[u8]) -> Result<Vec<u8>> {
        let comm = self.comm.lock().unwrap_or_else(|e| e.into_inner());
        // Every rank learns every length first: NCCL itself would read past a shorter buffer.
        let lengths = Self::gather(&comm, &[local.len() as u64], self.size)?;
        if lengths.iter().any(|&l| l != local.len() as u64) {
            return Err(Error::Collective(format!(
                "ranks gave {lengths:?} bytes: all must give the same"
            )));
        }
        Self::gather(&comm, local, self.size)
    }
}

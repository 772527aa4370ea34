//! The MPI side of [`super::Comm`] (feature `mpi`): thin calls on MPI_COMM_WORLD.
//!
//! MPI's default error handler (MPI_ERRORS_ARE_FATAL) already ends the job on a failed call, so these return
//! nothing to handle.

use mpi::collective::SystemOperation;
use mpi::environment::{Threading, Universe};
use mpi::topology::SimpleCommunicator;
use mpi::traits::{Communicator, CommunicatorCollectives, Root};

/// Largest element count per MPI call: MPI counts are C ints.
const MAX_COUNT: usize = i32::MAX as usize;

/// Initialises MPI with MPI_THREAD_MULTIPLE (the watchdog thread may call MPI_Abort while the main thread waits
/// in a collective); `(universe, rank, size)`, or None if MPI was already initialised.
pub(super) fn init() -> Option<(Universe, usize, usize)> {
    let (universe, level) = mpi::initialize_with_threading(Threading::Multiple)?;
    let world = universe.world();
    let (rank, size) = (world.rank() as usize, world.size() as usize);
    if level < Threading::Multiple && size > 1 && rank == 0 {
        eprintln!(
            "rrhf: this MPI provides thread level {level:?}, not Multiple: the collective watchdog may not be able \
             to end a hung job"
        );
    }
    Some((universe, rank, size))
}

fn world() -> SimpleCommunicator {
    SimpleCommunicator::world()
}

pub(super) fn abort(code: i32) -> ! {
    world().abort(code)
}

pub(super) fn all_reduce_sum_f32(buf: &mut [f32]) {
    let w = world();
    for part in buf.chunks_mut(MAX_COUNT) {
        // MPI_IN_PLACE is not exposed by the bindings: reduce from a copy.
        let send = part.to_vec();
        w.all_reduce_into(&send[..], part, SystemOperation::sum());
    }
}

pub(super) fn all_gather_f64(local: &[f64], size: usize) -> Vec<f64> {
    let mut out = vec![0f64; local.len() * size];
    world().all_gather_into(local, &mut out[..]);
    out
}

pub(super) fn broadcast_bytes(root: usize, bytes: &mut Vec<u8>) {
    let w = world();
    let root = w.process_at_rank(root as i32);
    // The length first, so the other ranks can size their buffer.
    let mut len = [bytes.len() as u64];
    root.broadcast_into(&mut len[..]);
    bytes.resize(len[0] as usize, 0);
    for part in bytes.chunks_mut(MAX_COUNT) {
        root.broadcast_into(part);
    }
}

pub(super) fn barrier() {
    world().barrier()
}

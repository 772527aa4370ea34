//! Sharded `rrhf sample` and `rrhf score` under mpirun: work is dealt to ranks in whole blocks (rank r takes blocks
//! r, r + N, …, by absolute position in the input, so a resumed run deals exactly as the first one), each rank writes
//! its own part file next to the output (`OUTPUT.rank{r}-of-{N}`, which `--resume` continues), and rank 0 merges
//! the parts into OUTPUT in input order. Since blocks are the commands' own batches, every record is computed in
//! the same batch as in one process, so the merged file equals one process's byte for byte (greedy sampling,
//! scoring). The parts live on the file system: under several nodes, OUTPUT must be on a shared one.

use std::path::{Path, PathBuf};

use crate::data::readers::{read_records, InputFormat, PromptTemplate, ReadOptions};
use crate::data::{DataError, Record};

use super::Comm;

/// This rank's share of a sharded command.
#[derive(Debug, Clone)]
pub struct Shard {
    rank: usize,
    size: usize,
    /// The merged output.
    output: PathBuf,
}

impl Shard {
    /// The share of `comm`'s rank in a command that writes `output`.
    pub fn new(comm: &Comm, output: &Path) -> Self {
        Shard {
            rank: comm.rank(),
            size: comm.size(),
            output: output.to_path_buf(),
        }
    }

    /// Whether the work is split (more than one rank).
    pub fn is_parallel(&self) -> bool {
        self.size > 1
    }

    /// Whether this rank writes the merged output.
    pub fn is_root(&self) -> bool {
        self.rank == 0
    }

    /// Where this rank writes (and resumes) its records: the output itself in a world of one.
    pub fn part(&self) -> PathBuf {
        part_path(&self.output, self.rank, self.size)
    }

    /// Whether block `block` (a batch, by absolute index in the input) is this rank's.
    pub fn owns(&self, block: usize) -> bool {
        block % self.size == self.rank
    }

    /// After every rank wrote its part: the records of rank `r`'s part, for each rank (all of them, in rank
    /// order). Waits for every rank first.
    fn read_parts(&self, comm: &Comm) -> Result<Vec<Vec<Record>>, DataError> {
        comm.barrier("waiting for every rank's part");
        (0..self.size)
            .map(|r| read_part(&part_path(&self.output, r, self.size)))
            .collect()
    }

    /// `rrhf sample`: the merged records, in input order, from parts whose records follow block order; block `b`
    /// (owned by rank b mod N) holds `block_sizes[b]` records. Every rank gets the result; rank 0 writes it.
    pub fn merge_blocks(
        &self,
        comm: &Comm,
        block_sizes: &[usize],
    ) -> Result<Vec<Record>, DataError> {
        let parts = self.read_parts(comm)?;
        let mut next = vec![0usize; self.size];
        let mut merged = Vec::with_capacity(block_sizes.iter().sum());
        for (b, &k) in block_sizes.iter().enumerate() {
            let r = b % self.size;
            let take = parts[r].get(next[r]..next[r] + k).ok_or_else(|| {
                part_mismatch(
                    &part_path(&self.output, r, self.size),
                    format!(
                        "it holds {} records, fewer than its share of the input",
                        parts[r].len()
                    ),
                )
            })?;
            merged.extend_from_slice(take);
            next[r] += k;
        }
        for (r, part) in parts.iter().enumerate() {
            if part.len() != next[r] {
                return Err(part_mismatch(
                    &part_path(&self.output, r, self.size),
                    format!(
                        "it holds {} records where its share of the input is {}",
                        part.len(),
                        next[r]
                    ),
                ));
            }
        }
        Ok(merged)
    }

    /// `rrhf score`: `records` (the whole input, this rank's share scored) with every other rank's scores filled
    /// in from its part (each part holds every record, scored or not, in input order). Every rank gets the result.
    pub fn merge_scores(&self, comm: &Comm, records: &mut [Record]) -> Result<(), DataError> {
        let parts = self.read_parts(comm)?;
        for (r, part) in parts.iter().enumerate() {
            let path = part_path(&self.output, r, self.size);
            if part.len() != records.len() {
                return Err(part_mismatch(
                    &path,
                    format!("{} records for {} in the input", part.len(), records.len()),
                ));
            }
            for (i, (mine, theirs)) in records.iter_mut().zip(part).enumerate() {
                if mine.query != theirs.query || mine.responses != theirs.responses {
                    return Err(part_mismatch(
                        &path,
                        format!("its record {} is not input record {}", i + 1, i + 1),
                    ));
                }
                if mine.scores.is_none() {
                    mine.scores.clone_from(&theirs.scores);
                }
            }
        }
        Ok(())
    }
}

/// The part file of rank `rank` of `size` for `output` (`output` itself for a world of one).
pub fn part_path(output: &Path, rank: usize, size: usize) -> PathBuf {
    if size <= 1 {
        return output.to_path_buf();
    }
    let mut name = output.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".rank{rank}-of-{size}"));
    output.with_file_name(name)
}

/// A part's records (an empty or missing part is none: a rank may own no block).
fn read_part(path: &Path) -> Result<Vec<Record>, DataError> {
    if !path.exists() {
        return Err(part_mismatch(path, "it is missing".into()));
    }
    let opts = ReadOptions {
        format: InputFormat::Rrhf,
        prompt_template: PromptTemplate::None,
        skip_invalid: false,
        require_scores: false,
    };
    match read_records(path, &opts) {
        Ok(r) => Ok(r.records),
        Err(DataError::Empty(_)) => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

fn part_mismatch(path: &Path, why: String) -> DataError {
    DataError::invalid(
        path,
        None,
        None,
        format!(
            "cannot merge this rank's part: {why}; it was written by another run (delete the .rank*-of-* parts and \
             run again, or --resume with the same world size and flags)"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_sit_next_to_the_output() {
        let out = Path::new("runs/x/scored.jsonl");
        assert_eq!(part_path(out, 0, 1), out);
        assert_eq!(
            part_path(out, 1, 4),
            Path::new("runs/x/scored.jsonl.rank1-of-4")
        );
    }
}

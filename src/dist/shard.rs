//! Sharded `rrhf sample` and `rrhf score` under mpirun: work is dealt to ranks in whole blocks (rank r takes blocks
//! r, r + N, …, by absolute position in the input, so a resumed run deals exactly as the first one), each rank writes
//! its own part file next to the output (`OUTPUT.rank{r}-of-{N}`, which `--resume` continues), and the ranks send
//! their parts to each other over MPI, so rank 0 writes OUTPUT merged in input order (no shared file system
//! needed). Since blocks are the commands' own batches, every record is computed in the same batch as in one
//! process, so the merged file equals one process's byte for byte (greedy sampling, scoring).

use std::path::{Path, PathBuf};

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

    /// `rrhf sample`: the merged output text, in input order, from every rank's part text (`mine`: this rank's,
    /// one record per line in block order). Block `b` (rank b mod N's) holds `block_sizes[b]` records. The lines
    /// travel as bytes, so the merge is exactly the records one process writes. Every rank gets the result.
    pub fn merge_lines(
        &self,
        comm: &Comm,
        mine: &[u8],
        block_sizes: &[usize],
    ) -> Result<Vec<u8>, DataError> {
        let parts = comm.all_gather_bytes("the exchange of the ranks' parts", mine);
        let lines: Vec<Vec<&[u8]>> = parts
            .iter()
            .map(|p| p.split_inclusive(|&c| c == b'\n').collect())
            .collect();
        let mut next = vec![0usize; self.size];
        let mut merged = Vec::with_capacity(parts.iter().map(Vec::len).sum());
        for (b, &k) in block_sizes.iter().enumerate() {
            let r = b % self.size;
            let take = lines[r].get(next[r]..next[r] + k).ok_or_else(|| {
                self.mismatch(
                    r,
                    format!("{} records, fewer than its share", lines[r].len()),
                )
            })?;
            take.iter().for_each(|l| merged.extend_from_slice(l));
            next[r] += k;
        }
        for (r, l) in lines.iter().enumerate() {
            if l.len() != next[r] {
                return Err(
                    self.mismatch(r, format!("{} records for a share of {}", l.len(), next[r]))
                );
            }
        }
        Ok(merged)
    }

    /// `rrhf score`: fills in `records` (the whole input, this rank's blocks of `block` records scored) with the
    /// scores every other rank computed for its blocks. Scores travel as f64 bits, not through JSON text, so they
    /// are exactly the other rank's values.
    pub fn merge_scores(
        &self,
        comm: &Comm,
        records: &mut [Record],
        block: usize,
    ) -> Result<(), DataError> {
        let block = block.max(1);
        // Per scored record of this rank: index, count, the scores.
        let mut mine: Vec<u8> = Vec::new();
        for (i, r) in records.iter().enumerate() {
            if let (true, Some(s)) = (self.owns(i / block), &r.scores) {
                mine.extend((i as u64).to_le_bytes());
                mine.extend((s.len() as u64).to_le_bytes());
                s.iter().for_each(|x| mine.extend(x.to_le_bytes()));
            }
        }
        let parts = comm.all_gather_bytes("the exchange of the ranks' scores", &mine);
        for (r, part) in parts.iter().enumerate() {
            let words: Vec<u64> = part
                .chunks_exact(8)
                .map(|w| u64::from_le_bytes(w.try_into().unwrap_or_default()))
                .collect();
            let mut at = 0;
            while at + 2 <= words.len() {
                let (i, n) = (words[at] as usize, words[at + 1] as usize);
                let scores = words.get(at + 2..at + 2 + n);
                let (Some(rec), Some(scores)) = (records.get_mut(i), scores) else {
                    return Err(self.mismatch(
                        r,
                        format!("scores for record {} of {}", i + 1, records.len()),
                    ));
                };
                if r != self.rank {
                    rec.scores = Some(scores.iter().map(|&w| f64::from_bits(w)).collect());
                }
                at += 2 + n;
            }
        }
        Ok(())
    }

    /// The error for a rank whose share does not fit this rank's view of the input.
    fn mismatch(&self, rank: usize, what: String) -> DataError {
        DataError::invalid(
            part_path(&self.output, rank, self.size),
            None,
            None,
            format!(
                "rank {rank} sent {what}: the ranks read different inputs; every rank must see the same files and \
                 flags"
            ),
        )
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

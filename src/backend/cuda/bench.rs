//! Benchmark support for the masked cross-entropy (used by `sft-collate bench loss` and
//! `benches/masked_ce.rs`): device-made inputs, the fused kernels and the unfused baseline, each one
//! launch sequence on the stream with no synchronization, and the byte counts bandwidth is judged by.

use std::sync::Arc;

use cudarc::driver::{sys, CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg};

use super::loss::{DeviceCeTargets, DeviceLabels, MaskedCrossEntropy};
use super::{cuda_err, module};
use crate::loss::{CeOptions, CeRequest, LogitElem, LogitsShape};
use crate::Result;

/// The device's theoretical memory bandwidth in bytes/s (2 × memory clock × bus width), the physical
/// limit the kernels are judged against.
pub fn peak_bandwidth(stream: &Arc<CudaStream>) -> Result<f64> {
    let ctx = stream.context();
    let clock_khz = ctx
        .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE)
        .map_err(cuda_err)?;
    let bus_bits = ctx
        .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH)
        .map_err(cuda_err)?;
    Ok(2.0 * f64::from(clock_khz) * 1e3 * f64::from(bus_bits) / 8.0)
}

/// Keep `stream` busy for at least `nanos` nanoseconds (at SM clocks up to 2 GHz): one thread spinning
/// on its SM's cycle counter. For tests that must tell whether a call waited for the device (it returns
/// before the spin ends if it did not). Keep the returned module until the spin is over: dropping it
/// unloads the module, and unloading waits for its kernels to finish.
#[must_use = "dropping the module waits for the spin to end"]
pub fn spin(stream: &Arc<CudaStream>, nanos: u64) -> Result<Arc<cudarc::driver::CudaModule>> {
    let cycles = nanos.saturating_mul(2);
    let (module, _) = module::load(
        stream.context(),
        crate::kernels::kernel("fill").expect("embedded"),
    )?;
    let spin = module.load_function("spin").map_err(cuda_err)?;
    let one = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (1, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the kernel reads the timer and touches no memory.
    unsafe { stream.launch_builder(&spin).arg(&cycles).launch(one) }.map_err(cuda_err)?;
    Ok(module)
}

fn blocks_of_256(blocks: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// `n` elements of `T` uniform in [-spread, spread), made on the device by `kernels/fill.cu` from `seed`.
fn filled<T: LogitElem>(
    stream: &Arc<CudaStream>,
    n: usize,
    seed: u64,
    spread: f32,
) -> Result<CudaSlice<T>> {
    let (fill, _) = module::load(
        stream.context(),
        crate::kernels::kernel("fill").expect("embedded"),
    )?;
    let function = fill
        .load_function(&format!("fill_logits_{}", T::SUFFIX))
        .map_err(cuda_err)?;
    // SAFETY: the fill kernel below writes all n elements before any use.
    let mut out = unsafe { stream.alloc::<T>(n.max(1)) }.map_err(cuda_err)?;
    let n64 = n as u64;
    // SAFETY: the kernel writes out[i] for i < n only (grid-stride), and `out` holds n elements.
    unsafe {
        stream
            .launch_builder(&function)
            .arg(&mut out)
            .arg(&n64)
            .arg(&seed)
            .arg(&spread)
            .launch(blocks_of_256(4096))
    }
    .map_err(cuda_err)?;
    Ok(out)
}

/// Random labels in `[0, vocab)` for `rows` rows, and a mask that trains each row with probability
/// `masked_fraction` (a uniform draw from the top 53 bits of xorshift64), always the same.
fn random_targets(rows: usize, vocab: usize, masked_fraction: f64) -> (Vec<i64>, Vec<u8>) {
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let labels = (0..rows).map(|_| (next() % vocab as u64) as i64).collect();
    let mask = (0..rows)
        .map(|_| u8::from(((next() >> 11) as f64 / (1u64 << 53) as f64) < masked_fraction))
        .collect();
    (labels, mask)
}

/// What a benchmarked call computes beyond the loss and the per-token log-probs (each picks a kernel
/// variant: the work not asked for is left out).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LossCase {
    /// Loss and log-probs only.
    Lean,
    /// Also the entropy.
    Entropy,
    /// Also the entropy and the argmax (token accuracy).
    Argmax,
    /// Everything: entropy, argmax, z-loss 1e-4, label smoothing 0.1, softcap 30.
    AllOptions,
}

impl LossCase {
    pub const ALL: [LossCase; 4] = [
        LossCase::Lean,
        LossCase::Entropy,
        LossCase::Argmax,
        LossCase::AllOptions,
    ];

    pub fn name(self) -> &'static str {
        match self {
            LossCase::Lean => "lean",
            LossCase::Entropy => "+ entropy",
            LossCase::Argmax => "+ entropy, argmax",
            LossCase::AllOptions => "all options",
        }
    }

    fn options_and_request(self, base: &CeOptions) -> (CeOptions, CeRequest) {
        let lean = CeRequest {
            log_probs: true,
            ..CeRequest::NONE
        };
        match self {
            LossCase::Lean => (*base, lean),
            LossCase::Entropy => (
                *base,
                CeRequest {
                    entropy: true,
                    ..lean
                },
            ),
            LossCase::Argmax => (
                *base,
                CeRequest {
                    entropy: true,
                    argmax: true,
                    ..lean
                },
            ),
            LossCase::AllOptions => (
                CeOptions {
                    z_loss: 1e-4,
                    label_smoothing: 0.1,
                    softcap: Some(30.0),
                    ..*base
                },
                CeRequest {
                    entropy: true,
                    argmax: true,
                    ..lean
                },
            ),
        }
    }
}

/// A masked cross-entropy problem held on the device, ready to be run repeatedly.
pub struct LossBench<T> {
    stream: Arc<CudaStream>,
    fused: MaskedCrossEntropy,
    /// The same kernels with the one-read forward+backward (sm_90+: clusters; `None` elsewhere).
    one_read: Option<MaskedCrossEntropy>,
    /// The unfused baseline's kernels for `T`, looked up once: log-softmax, gather, sum, backward.
    unfused: [CudaFunction; 4],
    logits: CudaSlice<T>,
    labels: CudaSlice<i64>,
    mask: CudaSlice<u8>,
    shape: LogitsShape,
    masked_rows: usize,
    options: CeOptions,
}

impl<T: LogitElem> LossBench<T> {
    /// `rows × vocab` logits uniform in [-8, 8) made on the device, random labels, and a random
    /// `masked_fraction` of the rows masked.
    pub fn new(
        stream: Arc<CudaStream>,
        rows: usize,
        vocab: usize,
        masked_fraction: f64,
    ) -> Result<Self> {
        let fused = MaskedCrossEntropy::new(stream.clone())?;
        let one_read = MaskedCrossEntropy::new(stream.clone())?
            .with_row_kernel(crate::backend::CeRowKernel::OneRead { smem_per_cta: None })?;
        let one_read = one_read.has_one_read().then_some(one_read);
        let (unfused_module, _) = module::load(
            stream.context(),
            crate::kernels::kernel("unfused_ce").expect("embedded"),
        )?;
        let logits = filled::<T>(&stream, rows * vocab, 0x5eed, 8.0)?;
        let (labels, mask) = random_targets(rows, vocab, masked_fraction);
        let masked_rows = mask.iter().filter(|&&m| m == 1).count();
        Ok(LossBench {
            labels: stream.clone_htod(&labels).map_err(cuda_err)?,
            mask: stream.clone_htod(&mask).map_err(cuda_err)?,
            stream,
            fused,
            one_read,
            unfused: [
                format!("unfused_log_softmax_{}", T::SUFFIX),
                "unfused_gather_nll".to_string(),
                "unfused_sum".to_string(),
                format!("unfused_softmax_grad_{}", T::SUFFIX),
            ]
            .map(|name| unfused_module.load_function(&name).map_err(cuda_err))
            .into_iter()
            .collect::<Result<Vec<_>>>()?
            .try_into()
            .expect("four kernels"),
            logits,
            shape: LogitsShape::dense(rows, vocab),
            masked_rows,
            options: CeOptions::default(),
        })
    }

    /// One 256-thread block per row (grid-stride past 2^20 rows), as the baseline's row kernels take.
    fn per_row(&self) -> LaunchConfig {
        blocks_of_256(self.shape.rows.clamp(1, 1 << 20))
    }

    pub fn masked_rows(&self) -> usize {
        self.masked_rows
    }

    fn targets(&self) -> DeviceCeTargets<'_> {
        DeviceCeTargets::new(self.shape, DeviceLabels::I64(&self.labels), &self.mask)
    }

    /// Bytes the fused forward must move: one read of every masked row.
    pub fn forward_bytes(&self) -> f64 {
        (self.masked_rows * self.shape.vocab * std::mem::size_of::<T>()) as f64
    }

    /// Bytes the fused forward+backward must move at the least: one read of every masked row and one write
    /// of the whole gradient (zeros on unmasked rows).
    pub fn forward_backward_bytes(&self) -> f64 {
        self.forward_bytes()
            + (self.shape.rows * self.shape.vocab * std::mem::size_of::<T>()) as f64
    }

    /// The fused forward (per-token log-probs and the loss: the lean kernel), not synchronized.
    pub fn fused_forward(&self) -> Result<()> {
        self.fused_forward_case(LossCase::Lean)
    }

    /// The fused forward+backward into a new gradient buffer (lean), not synchronized.
    pub fn fused_forward_backward(&self) -> Result<()> {
        self.fused_forward_backward_case(LossCase::Lean)
    }

    /// The one-read forward+backward (lean) into a new gradient buffer, not synchronized; `None` where
    /// the device has no clusters.
    pub fn one_read_forward_backward(&self) -> Option<Result<()>> {
        let (options, request) = LossCase::Lean.options_and_request(&self.options);
        let kernels = self.one_read.as_ref()?;
        Some(
            kernels
                .forward_backward(&self.logits, &self.targets(), &options, request)
                .map(drop),
        )
    }

    /// The fused forward with what `case` asks for, not synchronized.
    pub fn fused_forward_case(&self, case: LossCase) -> Result<()> {
        let (options, request) = case.options_and_request(&self.options);
        self.fused
            .forward(&self.logits, &self.targets(), &options, request)
            .map(drop)
    }

    /// The fused forward+backward with what `case` asks for, not synchronized.
    pub fn fused_forward_backward_case(&self, case: LossCase) -> Result<()> {
        let (options, request) = case.options_and_request(&self.options);
        self.fused
            .forward_backward(&self.logits, &self.targets(), &options, request)
            .map(drop)
    }

    /// The unfused baseline's forward: log-softmax of every row written in f32, gather, masked sum.
    pub fn unfused_forward(&self) -> Result<CudaSlice<f32>> {
        let (rows, vocab) = (self.shape.rows as u64, self.shape.vocab as u64);
        let s = &self.stream;
        // SAFETY: both buffers are fully written by the kernels below before they are read.
        let mut logsm = unsafe { s.alloc::<f32>((self.shape.rows * self.shape.vocab).max(1)) }
            .map_err(cuda_err)?;
        let mut nll = unsafe { s.alloc::<f32>(self.shape.rows.max(1)) }.map_err(cuda_err)?;
        let mut total = s.alloc_zeros::<f32>(1).map_err(cuda_err)?;
        let per_thread = blocks_of_256(self.shape.rows.div_ceil(256).max(1));
        let [log_softmax, gather, sum, _] = &self.unfused;
        // SAFETY: logits hold rows × vocab elements, logsm as many f32, labels and mask one per row (made
        // in `new`, labels in [0, vocab)); each kernel stays inside those bounds.
        unsafe {
            s.launch_builder(log_softmax)
                .arg(&self.logits)
                .arg(&rows)
                .arg(&vocab)
                .arg(&mut logsm)
                .launch(self.per_row())
                .map_err(cuda_err)?;
            s.launch_builder(gather)
                .arg(&logsm)
                .arg(&self.labels)
                .arg(&self.mask)
                .arg(&rows)
                .arg(&vocab)
                .arg(&mut nll)
                .launch(per_thread)
                .map_err(cuda_err)?;
            s.launch_builder(sum)
                .arg(&nll)
                .arg(&rows)
                .arg(&mut total)
                .launch(blocks_of_256(1))
                .map_err(cuda_err)?;
        }
        Ok(logsm)
    }

    /// The unfused baseline's forward then backward (softmax minus one-hot from the stored log-softmax).
    pub fn unfused_forward_backward(&self) -> Result<()> {
        let logsm = self.unfused_forward()?;
        let (rows, vocab) = (self.shape.rows as u64, self.shape.vocab as u64);
        let s = &self.stream;
        // SAFETY: the kernel writes every element of the gradient.
        let mut grad = unsafe { s.alloc::<T>((self.shape.rows * self.shape.vocab).max(1)) }
            .map_err(cuda_err)?;
        let backward = &self.unfused[3];
        let scale = 1.0f32 / self.masked_rows.max(1) as f32;
        // SAFETY: logsm and grad hold rows × vocab elements; labels and mask one per row.
        unsafe {
            s.launch_builder(backward)
                .arg(&logsm)
                .arg(&self.labels)
                .arg(&self.mask)
                .arg(&rows)
                .arg(&vocab)
                .arg(&scale)
                .arg(&mut grad)
                .launch(self.per_row())
        }
        .map_err(cuda_err)?;
        Ok(())
    }
}

/// Times of the cases of [`LossBench`], in seconds per call, and the bytes each must move.
#[derive(Clone, Debug)]
pub struct LossBenchReport {
    pub fused_forward: f64,
    pub fused_forward_backward: f64,
    /// The one-read forward+backward (lean; sm_90+ where the row fits in a cluster, else `None`).
    pub one_read_forward_backward: Option<f64>,
    /// The fused forward and forward+backward of every [`LossCase`] (the lean one again, measured beside
    /// the others).
    pub cases: Vec<(LossCase, f64, f64)>,
    pub unfused_forward: f64,
    pub unfused_forward_backward: f64,
    pub forward_bytes: f64,
    pub forward_backward_bytes: f64,
    /// The device's peak memory bandwidth, bytes/s.
    pub peak: f64,
}

impl<T: LogitElem> LossBench<T> {
    /// Each case once to warm up, then `iters` times between two synchronizations.
    pub fn measure(&self, iters: u32) -> Result<LossBenchReport> {
        let time = |f: &dyn Fn() -> Result<()>| -> Result<f64> {
            f()?;
            self.stream.synchronize().map_err(cuda_err)?;
            let start = std::time::Instant::now();
            for _ in 0..iters {
                f()?;
            }
            self.stream.synchronize().map_err(cuda_err)?;
            Ok(start.elapsed().as_secs_f64() / f64::from(iters.max(1)))
        };
        Ok(LossBenchReport {
            fused_forward: time(&|| self.fused_forward())?,
            fused_forward_backward: time(&|| self.fused_forward_backward())?,
            one_read_forward_backward: match self.one_read_forward_backward() {
                Some(_) => Some(time(&|| self.one_read_forward_backward().expect("loaded"))?),
                None => None,
            },
            cases: LossCase::ALL
                .into_iter()
                .map(|case| {
                    Ok((
                        case,
                        time(&|| self.fused_forward_case(case))?,
                        time(&|| self.fused_forward_backward_case(case))?,
                    ))
                })
                .collect::<Result<_>>()?,
            unfused_forward: time(&|| self.unfused_forward().map(drop))?,
            unfused_forward_backward: time(&|| self.unfused_forward_backward())?,
            forward_bytes: self.forward_bytes(),
            forward_backward_bytes: self.forward_backward_bytes(),
            peak: peak_bandwidth(&self.stream)?,
        })
    }
}

/// The fused linear cross-entropy's benchmark (feature `cublas`): hidden states `[N, H]` and an LM head
/// `[V, H]` made on the device, random labels, a fraction of the rows masked; forward+backward with
/// `d hidden` and `d weight` at any chunk size. A chunk of all `N` rows is the unfused computation (the
/// whole `[N, V]` logits made by one GEMM, the kernel over them, two GEMMs): the baseline, by the same
/// code.
#[cfg(feature = "cublas")]
pub struct LinearBench<T> {
    stream: Arc<CudaStream>,
    ce: MaskedCrossEntropy,
    linear: super::LinearCrossEntropy,
    hidden: CudaSlice<T>,
    weight: CudaSlice<T>,
    labels: CudaSlice<i64>,
    mask: CudaSlice<u8>,
    d_hidden: CudaSlice<T>,
    d_weight: CudaSlice<f32>,
    row_loss: CudaSlice<f32>,
    scalars: CudaSlice<f32>,
    count: CudaSlice<u32>,
    error_flag: CudaSlice<u32>,
    shape: LogitsShape,
    hidden_size: usize,
}

#[cfg(feature = "cublas")]
impl<T: LogitElem> LinearBench<T> {
    /// Hidden states uniform in [-2, 2), the head in ±1/√H (logits of a few units), `masked_fraction` of
    /// the rows trained.
    pub fn new(
        stream: Arc<CudaStream>,
        rows: usize,
        hidden_size: usize,
        vocab: usize,
        masked_fraction: f64,
    ) -> Result<Self> {
        let hidden = filled::<T>(&stream, rows * hidden_size, 0x41, 2.0)?;
        let weight = filled::<T>(
            &stream,
            vocab * hidden_size,
            0x42,
            1.0 / (hidden_size as f32).sqrt(),
        )?;
        let (labels, mask) = random_targets(rows, vocab, masked_fraction);
        // SAFETY (all four): written by every run before they are read (d hidden by its GEMMs, the
        // outputs by the kernels); d weight is zeroed.
        let alloc_f32 = |n| unsafe { stream.alloc::<f32>(n) }.map_err(cuda_err);
        Ok(LinearBench {
            ce: MaskedCrossEntropy::new(stream.clone())?,
            linear: super::LinearCrossEntropy::new(stream.clone())?,
            labels: stream.clone_htod(&labels).map_err(cuda_err)?,
            mask: stream.clone_htod(&mask).map_err(cuda_err)?,
            d_hidden: unsafe { stream.alloc::<T>(rows * hidden_size) }.map_err(cuda_err)?,
            d_weight: stream
                .alloc_zeros::<f32>(vocab * hidden_size)
                .map_err(cuda_err)?,
            row_loss: alloc_f32(rows)?,
            scalars: alloc_f32(3)?,
            count: unsafe { stream.alloc::<u32>(3) }.map_err(cuda_err)?,
            error_flag: unsafe { stream.alloc::<u32>(1) }.map_err(cuda_err)?,
            hidden,
            weight,
            shape: LogitsShape::dense(rows, vocab),
            hidden_size,
            stream,
        })
    }

    /// Liger's chunk rule at this shape (what `Device::linear_cross_entropy` takes by default).
    pub fn default_chunk(&self) -> usize {
        crate::loss::linear::LinearCeConfig::default()
            .chunk_rows(
                self.shape.rows,
                self.shape.vocab,
                self.hidden_size,
                std::mem::size_of::<T>(),
            )
            .expect("a valid default")
    }

    /// The bytes of the chunk of logits a run at `chunk` rows allocates (its extra memory beside
    /// cuBLAS's workspace).
    pub fn chunk_bytes(&self, chunk: usize) -> usize {
        chunk.min(self.shape.rows)
            * crate::loss::linear::linear_row_stride::<T>(self.shape.vocab)
            * std::mem::size_of::<T>()
    }

    /// One forward+backward (`d hidden`, `d weight` accumulated) at `chunk` rows, enqueued on the
    /// stream (not synchronized).
    pub fn run(&mut self, chunk: usize) -> Result<()> {
        use super::memory::{DeviceRead, DeviceWrite};
        let targets = DeviceCeTargets::new(self.shape, DeviceLabels::I64(&self.labels), &self.mask);
        let input = super::LinearCeDeviceInput {
            hidden: &self.hidden as &dyn DeviceRead<T>,
            weight: &self.weight,
            bias: None,
            hidden_size: self.hidden_size,
        };
        let grads = super::LinearCeDeviceGrads {
            hidden: Some(&mut self.d_hidden as &mut dyn DeviceWrite<T>),
            weight: Some(&mut self.d_weight),
            bias: None,
        };
        let mut outputs = super::CeBuffers {
            row_loss: &mut self.row_loss,
            row_z: None,
            log_probs: None,
            entropy: None,
            lse: None,
            argmax: None,
            scalars: &mut self.scalars,
            count: &mut self.count,
            doc_trained: None,
            error_flag: &mut self.error_flag,
        };
        self.linear.compute(
            &self.ce,
            &input,
            &targets,
            &CeOptions::default(),
            grads,
            &mut outputs,
            chunk,
        )
    }

    /// The loss of the last run (synchronizes).
    pub fn loss(&self) -> Result<f32> {
        Ok(self.stream.clone_dtoh(&self.scalars).map_err(cuda_err)?[1])
    }
}

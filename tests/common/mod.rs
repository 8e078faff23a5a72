//! Helpers shared by the integration tests: where the shared fixtures are, and how a test that needs them
//! skips (visibly) or fails (under CI).
#![allow(dead_code)]

pub mod ce;

/// One test per property and device: `on_cpu::name`, `on_emulator::name`, `on_cuda::name` (ignored
/// without a GPU), each calling `name(&Device)` of the enclosing module.
#[macro_export]
macro_rules! device_tests {
    ($($name:ident),* $(,)?) => {
        mod on_cpu {
            $(#[test] fn $name() { super::$name(&sft_collate::Device::cpu()); })*
        }
        #[cfg(feature = "emulation")]
        mod on_emulator {
            $(#[test] fn $name() { super::$name(&sft_collate::Device::emulated()); })*
        }
        #[cfg(feature = "cuda")]
        mod on_cuda {
            $(
                #[test]
                #[ignore = "needs a CUDA device"]
                fn $name() { super::$name(&sft_collate::Device::cuda(0).expect("a CUDA device")); }
            )*
        }
    };
}

/// The cross-entropy properties again on the one-read forward+backward kernels (a thread-block cluster
/// per row, `kernels/masked_ce_cluster.cu`): `on_emulator_one_read::name`, `on_cuda_one_read::name`
/// (ignored without a GPU). Each CTA gets `ONE_READ_TEST_SMEM` bytes of shared memory, so that the
/// properties' vocabularies take clusters of 1, 2, 4 and 8 CTAs, and the two-pass kernel beyond.
#[macro_export]
macro_rules! one_read_tests {
    ($($name:ident),* $(,)?) => {
        #[cfg(feature = "emulation")]
        mod on_emulator_one_read {
            $(#[test] fn $name() { super::$name(&$crate::common::one_read(sft_collate::Device::emulated())); })*
        }
        #[cfg(feature = "cuda")]
        mod on_cuda_one_read {
            $(
                #[test]
                #[ignore = "needs a CUDA device"]
                fn $name() {
                    let device = sft_collate::Device::cuda(0).expect("a CUDA device");
                    super::$name(&$crate::common::one_read(device));
                }
            )*
        }
    };
}

/// Per-CTA shared memory of the one-read tests: the head and 1,024 bytes of the row (256 f32 columns,
/// 512 bf16 or f16), so 8 CTAs hold rows of up to 2,048 f32 or 4,096 16-bit columns.
pub const ONE_READ_TEST_SMEM: usize = sft_collate::backend::abi::CE_CLUSTER_HEAD as usize + 1024;

/// `device` on the one-read kernels with [`ONE_READ_TEST_SMEM`] per CTA.
pub fn one_read(device: sft_collate::Device) -> sft_collate::Device {
    device.with_ce_row_kernel(sft_collate::CeRowKernel::OneRead {
        smem_per_cta: Some(ONE_READ_TEST_SMEM),
    })
}

use std::path::PathBuf;

/// `$SFT_COLLATE_SHARED`, else `../shared` beside the crate. `None` (after saying so on stderr) when it is
/// absent on a user's machine; a panic under `CI=true`, where the fixtures must be present.
pub fn shared_dir(test: &str) -> Option<PathBuf> {
    let dir = std::env::var_os("SFT_COLLATE_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared"));
    if dir.join("fixtures").is_dir() {
        return Some(dir);
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!(
            "{test}: shared fixtures not found at {} (CI=true requires them; set SFT_COLLATE_SHARED)",
            dir.display()
        );
    }
    eprintln!(
        "SKIPPED {test}: shared fixtures not found at {} (set SFT_COLLATE_SHARED to run it)",
        dir.display()
    );
    None
}

/// Read and parse a JSON fixture under `fixtures/`.
pub fn fixture_json(shared: &std::path::Path, rel: &str) -> serde_json::Value {
    let path = shared.join("fixtures").join(rel);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Random collation options for the kernel-vs-oracle tests: explicit pad id, optional
/// `pad_to_multiple_of` below `max_multiple`, either label format and id dtype, with or without
/// `attention_mask`; no truncation.
pub fn spec_strategy(
    max_multiple: usize,
) -> impl proptest::strategy::Strategy<Value = sft_collate::CollateSpec> {
    use proptest::prelude::*;
    use sft_collate::{CollateSpec, IdDtype, LabelFormat};
    (
        prop::option::of(1usize..max_multiple),
        prop_oneof![Just(LabelFormat::Pad), Just(LabelFormat::IGNORE_INDEX)],
        prop_oneof![Just(IdDtype::I32), Just(IdDtype::I64)],
        0u32..200_000,
        any::<bool>(),
    )
        .prop_map(
            |(pad_to_multiple_of, label_format, id_dtype, pad, attention_mask)| CollateSpec {
                pad_id: Some(pad),
                pad_to_multiple_of,
                label_format,
                id_dtype,
                attention_mask,
                ..Default::default()
            },
        )
}

/// The Qwen2 tokenizer of the fixtures.
pub fn qwen2(shared: &std::path::Path) -> sft_collate::Tokenizer {
    sft_collate::Tokenizer::from_file(shared.join("fixtures/qwen2/tokenizer.json"))
        .expect("qwen2 tokenizer")
}

//! build.rs must really compile the kernels with NVRTC where it can (CI installs NVRTC, so there it must),
//! and the embedded PTX must hold every entry point the backends load.

use sft_collate::backend::abi::CeVariant;
use sft_collate::kernels;

/// The main cross-entropy kernels, by the names the launchers look them up by.
fn ce_kernels() -> Vec<String> {
    let mut names = Vec::new();
    for backward in [false, true] {
        for suffix in ["f32", "f16", "bf16"] {
            names.extend(CeVariant::ALL.map(|v| v.kernel(backward, suffix)));
        }
    }
    names
}

/// The entry points of `family`, as the Rust side loads them.
fn entries(family: &str, listed: &[&str]) -> Vec<String> {
    let mut all: Vec<String> = listed.iter().map(|e| e.to_string()).collect();
    if family == "masked_ce_cluster" {
        for suffix in ["f32", "f16", "bf16"] {
            all.extend(CeVariant::ALL.map(|v| v.cluster_kernel(suffix)));
        }
    }
    if family == "masked_ce" {
        all.extend(ce_kernels());
        // Vocabulary-parallel partials and gradient (launched by the emulator; compiled for the GPU).
        for op in ["fwd", "bwd"] {
            all.extend(["f32", "f16", "bf16"].map(|s| format!("masked_ce_shard_{op}_{s}")));
        }
    }
    all
}

/// Every kernel family and the entry points the Rust side loads from it.
const EXPECTED: &[(&str, &[&str])] = &[
    (
        "collate",
        &[
            "collate_i32",
            "collate_i64",
            "collate_pack_i32",
            "collate_pack_i64",
        ],
    ),
    (
        "fill",
        &[
            "fill_logits_f32",
            "fill_logits_f16",
            "fill_logits_bf16",
            "spin",
        ],
    ),
    (
        "masked_ce",
        &["masked_ce_count", "masked_ce_documents", "masked_ce_reduce"],
    ),
    // The one-read forward+backward kernels (thread-block clusters: PTX for sm_90).
    ("masked_ce_cluster", &[]),
    (
        "unfused_ce",
        &[
            "unfused_log_softmax_f32",
            "unfused_log_softmax_f16",
            "unfused_log_softmax_bf16",
            "unfused_softmax_grad_f32",
            "unfused_softmax_grad_f16",
            "unfused_softmax_grad_bf16",
            "unfused_gather_nll",
            "unfused_sum",
        ],
    ),
];

#[test]
fn embedded_ptx_holds_every_entry_point() {
    for (family, entries_listed) in EXPECTED {
        let kernel = kernels::kernel(family).unwrap_or_else(|| panic!("{family}.cu not embedded"));
        let Some(ptx) = kernel.ptx else {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("CI=true but build.rs embedded no PTX for {family}.cu (NVRTC not found at build time)");
            }
            eprintln!(
                "SKIPPED PTX check for {family}.cu: built without NVRTC (set SFT_COLLATE_NVRTC)"
            );
            continue;
        };
        assert!(ptx.contains(&format!(
            ".target {}",
            kernel.arch.replace("compute_", "sm_")
        )));
        let number = |arch: &str| arch.trim_start_matches("compute_").parse::<u32>().unwrap();
        let expected_arch = match *family {
            // Clusters need sm_90: never less, whatever the build's architecture.
            "masked_ce_cluster" if number(kernels::PTX_ARCH) < 90 => "compute_90",
            _ => kernels::PTX_ARCH,
        };
        assert_eq!(kernel.arch, expected_arch, "{family}");
        for entry in entries(family, entries_listed) {
            assert!(
                ptx.contains(&format!(".visible .entry {entry}(")),
                "{entry} missing from the PTX of {family}.cu"
            );
        }
    }
    assert_eq!(
        kernels::KERNELS.len(),
        EXPECTED.len(),
        "a kernel family without expected entry points"
    );
}

#[test]
fn embedded_sources_are_self_contained() {
    // The run-time NVRTC compile has no include path: build.rs must have inlined the local headers.
    for kernel in kernels::KERNELS {
        assert!(
            !kernel.source.contains("#include"),
            "{} still has an #include",
            kernel.name
        );
    }
}

/// The kernels that take an argument struct (kernels/abi.cuh), and which.
const ABI_ENTRIES: &[(&str, &[&str], &str)] = &[
    ("collate", &["collate_i32", "collate_i64"], "CollateArgs"),
    (
        "collate",
        &["collate_pack_i32", "collate_pack_i64"],
        "CollatePackArgs",
    ),
    (
        "masked_ce",
        &["masked_ce_count", "masked_ce_documents", "masked_ce_reduce"],
        "CeArgs",
    ),
    ("masked_ce_cluster", &[], "CeArgs"),
];

#[test]
fn each_kernel_takes_one_parameter_the_size_of_its_generated_struct() {
    use sft_collate::backend::abi::ABI_LAYOUT;
    for (family, listed, name) in ABI_ENTRIES {
        let Some(ptx) = kernels::kernel(family).and_then(|k| k.ptx) else {
            eprintln!("SKIPPED ABI check for {family}.cu: built without NVRTC");
            continue;
        };
        let size = ABI_LAYOUT
            .iter()
            .find(|(what, _)| what == name)
            .unwrap_or_else(|| panic!("{name} not generated"))
            .1;
        for entry in entries(family, listed) {
            let start = ptx
                .find(&format!(".visible .entry {entry}("))
                .unwrap_or_else(|| panic!("{entry} missing"));
            let signature = &ptx[start..start + ptx[start..].find(')').unwrap()];
            assert_eq!(
                signature.matches(".param").count(),
                1,
                "{entry}: one parameter"
            );
            assert!(
                signature.contains(&format!("{entry}_param_0[{size}]")),
                "{entry} does not take {size} bytes ({name}): {signature}"
            );
        }
    }
}

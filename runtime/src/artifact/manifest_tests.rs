use super::*;

/// A small but complete plan: one generated module and one micro-kernel, weights, an arena.
fn sample(dir: &Path) -> Manifest {
    std::fs::write(dir.join("model.qir"), "graph text").unwrap();
    std::fs::write(dir.join("model.qir.safetensors"), b"weights bytes").unwrap();
    std::fs::create_dir_all(dir.join("kernels")).unwrap();
    std::fs::write(dir.join("kernels/gen0.ptx"), ".version 8.0").unwrap();
    std::fs::write(dir.join("kernels/attention.cu"), "__global__ void k() {}").unwrap();
    let tokens = DimExpr::mul(DimExpr::sym("batch"), DimExpr::sym("seq"));
    Manifest {
        format_version: FORMAT_VERSION,
        model: "tiny".into(),
        scheme: "w4a4".into(),
        graph: "model.qir".into(),
        weights: FileRef { path: "model.qir.safetensors".into(), sha256: sha256_hex(b"weights bytes") },
        symbols: vec![Symbol { name: "batch".into(), max: 1 }, Symbol { name: "seq".into(), max: 128 }],
        inputs: vec![Io {
            name: "input_ids".into(),
            dtype: "i64".into(),
            dims: vec![DimExpr::sym("batch"), DimExpr::sym("seq")],
            buffer: 0,
        }],
        outputs: vec![Io {
            name: "logits".into(),
            dtype: "f32".into(),
            dims: vec![DimExpr::sym("batch"), DimExpr::sym("seq"), DimExpr::Const(8)],
            buffer: 2,
        }],
        buffers: vec![
            Buffer {
                id: 0,
                name: "input_ids".into(),
                dtype: "i64".into(),
                dims: vec![DimExpr::sym("batch"), DimExpr::sym("seq")],
                place: Place::Arena { offset: 0, bytes: 1024 },
                order: None,
            },
            Buffer {
                id: 1,
                name: "embed".into(),
                dtype: "f16".into(),
                dims: vec![DimExpr::Const(8), DimExpr::Const(4)],
                place: Place::Weight { tensor: "embed".into() },
                order: None,
            },
            Buffer {
                id: 2,
                name: "logits".into(),
                dtype: "f32".into(),
                dims: vec![DimExpr::sym("batch"), DimExpr::sym("seq"), DimExpr::Const(8)],
                place: Place::Arena { offset: 1024, bytes: 4096 },
                order: None,
            },
        ],
        arena_bytes: 5120,
        modules: vec![
            Module {
                name: "gen0".into(),
                kind: ModuleKind::Generated,
                path: "kernels/gen0.ptx".into(),
                sha256: sha256_hex(b".version 8.0"),
            },
            Module {
                name: "attention".into(),
                kind: ModuleKind::Micro,
                path: "kernels/attention.cu".into(),
                sha256: sha256_hex(b"__global__ void k() {}"),
            },
        ],
        launches: vec![Launch {
            node: "embed_gather".into(),
            module: "gen0".into(),
            entry: "gather_kernel".into(),
            grid: [DimExpr::ceil_div(tokens.clone(), DimExpr::Const(128)), DimExpr::Const(1), DimExpr::Const(1)],
            block: [128, 1, 1],
            shared_bytes: 0,
            args: vec![Arg::Buffer(0), Arg::Buffer(1), Arg::Buffer(2), Arg::I64(tokens), Arg::F32(0.125)],
        }],
        host_prologue: None,
    }
}

fn write(dir: &Path, manifest: &Manifest) {
    std::fs::write(dir.join(MANIFEST_FILE), manifest.to_json()).unwrap();
}

#[test]
fn sha256_matches_the_published_test_vectors() {
    // FIPS 180-2 examples.
    assert_eq!(sha256_hex(b""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    assert_eq!(sha256_hex(b"abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
}

#[test]
fn manifest_round_trips_through_json_and_loads() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = sample(dir.path());
    write(dir.path(), &manifest);
    let loaded = Manifest::load(dir.path()).unwrap();
    assert_eq!(loaded, manifest);
    // The wire format of the enums is part of the contract.
    let json = manifest.to_json();
    assert!(json.contains("\"ceil_div\""), "{json}");
    assert!(json.contains("\"arena\""), "{json}");
    assert!(json.contains("\"generated\""), "{json}");
    assert!(json.contains("\"f32\": 0.125"), "{json}");
    // A row-major buffer writes no order; a resident cache's order survives the trip.
    assert!(!json.contains("\"order\""), "{json}");
    let mut cached = manifest.clone();
    cached.buffers[2].order = Some(vec![1, 0, 2]);
    cached.validate().unwrap();
    let back: Manifest = serde_json::from_str(&cached.to_json()).unwrap();
    assert_eq!(back.buffers[2].order, Some(vec![1, 0, 2]));
    assert_eq!(back.buffers[2].storage_dims(&[2, 3, 8]), vec![3, 2, 8]);
}

#[test]
fn other_format_version_is_refused_before_the_fields_are_read() {
    let dir = tempfile::tempdir().unwrap();
    // A future manifest whose fields this runtime would not understand.
    std::fs::write(dir.path().join(MANIFEST_FILE), r#"{"format_version": 2, "something_new": true}"#).unwrap();
    let err = Manifest::load(dir.path()).unwrap_err();
    assert!(matches!(err, ManifestError::FormatVersion { found: 2, .. }), "{err}");
    assert!(err.to_string().contains("manifest.json"), "{err}");
}

#[test]
fn changed_weights_or_module_fail_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = sample(dir.path());
    write(dir.path(), &manifest);
    std::fs::write(dir.path().join("model.qir.safetensors"), b"weights bytez").unwrap();
    let err = Manifest::load(dir.path()).unwrap_err();
    match &err {
        ManifestError::Checksum { path, expected, actual } => {
            assert!(path.ends_with("model.qir.safetensors"));
            assert_eq!(expected, &manifest.weights.sha256);
            assert_eq!(actual, &sha256_hex(b"weights bytez"));
        }
        other => panic!("expected a checksum error, got {other}"),
    }

    let dir = tempfile::tempdir().unwrap();
    let manifest = sample(dir.path());
    write(dir.path(), &manifest);
    std::fs::write(dir.path().join("kernels/attention.cu"), "changed").unwrap();
    let err = Manifest::load(dir.path()).unwrap_err();
    assert!(err.to_string().contains("kernels/attention.cu"), "{err}");

    std::fs::remove_file(dir.path().join("kernels/attention.cu")).unwrap();
    let err = Manifest::load(dir.path()).unwrap_err();
    assert!(matches!(err, ManifestError::Io { .. }), "{err}");
    assert!(err.to_string().contains("attention.cu"), "{err}");
}

#[test]
fn paths_outside_the_artifact_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut manifest = sample(dir.path());
    manifest.modules[0].path = "../elsewhere.ptx".into();
    write(dir.path(), &manifest);
    let err = Manifest::load(dir.path()).unwrap_err();
    assert!(matches!(err, ManifestError::UnsafePath { .. }), "{err}");
    assert!(artifact_path(dir.path(), "/etc/passwd").is_err());
    assert!(artifact_path(dir.path(), "").is_err());
}

#[test]
fn broken_references_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let base = sample(dir.path());

    let mut m = base.clone();
    m.launches[0].args.push(Arg::Buffer(9));
    assert!(m.validate().unwrap_err().to_string().contains("unknown buffer 9"));

    let mut m = base.clone();
    m.launches[0].module = "missing".into();
    let err = m.validate().unwrap_err().to_string();
    assert!(err.contains("embed_gather") && err.contains("missing"), "{err}");

    let mut m = base.clone();
    m.buffers[2].place = Place::Arena { offset: 4096, bytes: 4096 };
    assert!(m.validate().unwrap_err().to_string().contains("arena_bytes"));

    let mut m = base.clone();
    m.launches[0].grid[1] = DimExpr::sym("past");
    assert!(m.validate().unwrap_err().to_string().contains("`past`"));

    let mut m = base.clone();
    m.buffers[1].dtype = "f17".into();
    assert!(m.validate().unwrap_err().to_string().contains("f17"));

    let mut m = base.clone();
    m.buffers[2].order = Some(vec![0, 0, 1]);
    let err = m.validate().unwrap_err().to_string();
    assert!(err.contains("logits") && err.contains("not a permutation"), "{err}");

    let mut m = base;
    m.host_prologue = Some(HostPrologue { values: vec!["rotary_cos".into()] });
    assert!(m.validate().unwrap_err().to_string().contains("rotary_cos"));
}

#[test]
fn dim_expressions_evaluate_with_checked_arithmetic() {
    let values: SymbolValues = [("batch".to_string(), 2), ("seq".to_string(), 77)].into();
    let tokens = DimExpr::mul(DimExpr::sym("batch"), DimExpr::sym("seq"));
    assert_eq!(tokens.eval(&values).unwrap(), 154);
    assert_eq!(
        DimExpr::ceil_div(tokens.clone(), DimExpr::Const(64)).eval(&values).unwrap(),
        3 // 154 / 64 = 2.4
    );
    assert_eq!(DimExpr::ceil_div(DimExpr::Const(128), DimExpr::Const(64)).eval(&values).unwrap(), 2);
    assert_eq!(DimExpr::add(tokens, DimExpr::Const(-4)).eval(&values).unwrap(), 150);
    let err = DimExpr::sym("past").eval(&values).unwrap_err();
    assert!(matches!(err, ManifestError::UnknownSymbol { .. }), "{err}");
    let err = DimExpr::ceil_div(DimExpr::Const(1), DimExpr::Const(0)).eval(&values).unwrap_err();
    assert!(matches!(err, ManifestError::Arithmetic { .. }), "{err}");
    let err = DimExpr::mul(DimExpr::Const(i64::MAX), DimExpr::Const(2)).eval(&values).unwrap_err();
    assert!(matches!(err, ManifestError::Arithmetic { .. }), "{err}");
}

#[test]
fn symbol_values_are_checked_against_the_plan() {
    let dir = tempfile::tempdir().unwrap();
    let m = sample(dir.path());
    let values = m.symbol_values(&[("batch", 1), ("seq", 100)]).unwrap();
    assert_eq!(values["seq"], 100);
    assert!(m.symbol_values(&[("batch", 1), ("seq", 129)]).is_err());
    assert!(m.symbol_values(&[("batch", 1)]).is_err());
}

use std::os::unix::fs::PermissionsExt;

use citadel_store::MemoryKeyBlobs;

use super::*;

const PEM: &str = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg\n-----END PRIVATE KEY-----\n";

fn kek(byte: u8) -> Kek {
    Kek::from_bytes(&[byte; KEK_LEN]).unwrap()
}

fn kek_file(dir: &Path, content: &str, mode: u32) -> PathBuf {
    let path = dir.join("kek");
    std::fs::write(&path, content).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    path
}

fn sealed_store(kek: Kek) -> (SealedKeyStore, Arc<MemoryKeyBlobs>) {
    let blobs = Arc::new(MemoryKeyBlobs::default());
    (SealedKeyStore::new(kek, blobs.clone()), blobs)
}

#[test]
fn reads_a_base64_kek_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = kek_file(
        dir.path(),
        &format!("{}\n", STANDARD.encode([7u8; 32])),
        0o600,
    );
    let read = Kek::read_file(&path).unwrap();
    assert_eq!(read.id(), kek(7).id());
    assert!(!format!("{read:?}").contains(&STANDARD.encode([7u8; 32])));
}

#[test]
fn rejects_a_kek_file_readable_by_others() {
    let dir = tempfile::tempdir().unwrap();
    for mode in [0o644, 0o640, 0o604, 0o660] {
        let path = kek_file(dir.path(), &STANDARD.encode([7u8; 32]), mode);
        let err = Kek::read_file(&path).unwrap_err();
        assert!(
            matches!(err, KekError::LoosePermissions { .. }),
            "mode {mode:o}: {err}"
        );
        assert!(err.to_string().contains("chmod 600"), "{err}");
    }
}

#[test]
fn rejects_a_kek_of_the_wrong_length() {
    let dir = tempfile::tempdir().unwrap();
    for (len, content) in [
        (16, STANDARD.encode([1u8; 16])),
        (33, STANDARD.encode([1u8; 33])),
        (0, String::new()),
    ] {
        let path = kek_file(dir.path(), &content, 0o600);
        let err = Kek::read_file(&path).unwrap_err();
        assert!(
            matches!(err, KekError::WrongLength { len: l, .. } if l == len),
            "{len}: {err}"
        );
        assert!(err.to_string().contains("exactly 32"), "{err}");
    }
    // 32 raw bytes (not base64) and text that is not base64 are refused too.
    for content in ["not base64 at all!", "0123456789abcdef0123456789abcdef"] {
        let path = kek_file(dir.path(), content, 0o600);
        assert!(Kek::read_file(&path).is_err(), "{content:?}");
    }
    assert!(matches!(
        Kek::from_bytes(&[0u8; 31]),
        Err(KekError::WrongLength { len: 31, .. })
    ));
}

#[test]
fn rejects_a_kek_path_that_is_not_a_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    assert!(matches!(
        Kek::read_file(dir.path()),
        Err(KekError::NotAFile(_))
    ));
    assert!(matches!(
        Kek::read_file(&dir.path().join("missing")),
        Err(KekError::Io { .. })
    ));
}

#[tokio::test]
async fn sealed_keys_round_trip_and_are_never_overwritten() {
    let (store, _) = sealed_store(kek(1));
    store
        .save("a.key.pem", &KeyPem::new(PEM.into()))
        .await
        .unwrap();
    assert_eq!(store.load("a.key.pem").await.unwrap().expose(), PEM);
    assert!(matches!(
        store.save("a.key.pem", &KeyPem::new("other".into())).await,
        Err(KeyStoreError::Exists(_))
    ));
    assert!(matches!(
        store.load("b.key.pem").await,
        Err(KeyStoreError::NotFound(_))
    ));
    assert!(matches!(
        store.load("../x").await,
        Err(KeyStoreError::InvalidRef(_))
    ));
}

#[tokio::test]
async fn each_seal_draws_a_fresh_nonce() {
    let (store, blobs) = sealed_store(kek(1));
    let key = KeyPem::new(PEM.into());
    store.save("a", &key).await.unwrap();
    let first = blobs.find_key_blob("a").await.unwrap().unwrap();
    let again = seal(&kek(1), &SystemRandom::new(), "a", &key).unwrap();
    assert_ne!(first, again, "same key, same reference, new nonce");
    assert_eq!(unseal(&kek(1), "a", &again).unwrap().expose(), PEM);
}

#[tokio::test]
async fn rejects_a_blob_moved_to_another_key_reference() {
    let (store, blobs) = sealed_store(kek(1));
    store
        .save("a.key.pem", &KeyPem::new(PEM.into()))
        .await
        .unwrap();
    let blob = blobs.find_key_blob("a.key.pem").await.unwrap().unwrap();
    blobs.overwrite("b.key.pem", &blob);
    let err = store.load("b.key.pem").await.unwrap_err();
    assert!(
        matches!(&err, KeyStoreError::Unseal { key_ref, .. } if key_ref == "b.key.pem"),
        "{err}"
    );
    assert!(err.to_string().contains("authentication failed"), "{err}");
    assert!(!err.to_string().contains("PRIVATE"));
}

#[tokio::test]
async fn rejects_a_tampered_blob() {
    let (store, blobs) = sealed_store(kek(1));
    store.save("a", &KeyPem::new(PEM.into())).await.unwrap();
    let blob = blobs.find_key_blob("a").await.unwrap().unwrap();
    let (head, body) = blob.rsplit_once(':').unwrap();
    let raw = STANDARD.decode(body).unwrap();
    // A flipped bit in the nonce, the ciphertext and the tag; a truncated blob; a changed
    // format version.
    for i in [0, NONCE_LEN + 3, raw.len() - 1] {
        let mut bad = raw.clone();
        bad[i] ^= 0x01;
        blobs.overwrite("a", &format!("{head}:{}", STANDARD.encode(&bad)));
        let err = store.load("a").await.unwrap_err();
        assert!(
            err.to_string().contains("authentication failed"),
            "{i}: {err}"
        );
    }
    blobs.overwrite("a", &format!("{head}:{}", STANDARD.encode(&raw[..20])));
    assert!(matches!(
        store.load("a").await,
        Err(KeyStoreError::Unseal { .. })
    ));
    blobs.overwrite("a", &blob.replacen(":v1:", ":v2:", 1));
    let err = store.load("a").await.unwrap_err();
    assert!(
        err.to_string().contains("unsupported sealed-key format"),
        "{err}"
    );
    blobs.overwrite("a", &blob);
    assert_eq!(store.load("a").await.unwrap().expose(), PEM);
}

#[tokio::test]
async fn a_wrong_kek_fails_with_a_clear_error() {
    let blobs = Arc::new(MemoryKeyBlobs::default());
    let right = SealedKeyStore::new(kek(1), blobs.clone());
    right.save("a", &KeyPem::new(PEM.into())).await.unwrap();
    let wrong = SealedKeyStore::new(kek(2), blobs.clone());
    let err = wrong.load("a").await.unwrap_err().to_string();
    assert!(
        err.contains(kek(1).id()) && err.contains(kek(2).id()),
        "{err}"
    );
    assert!(err.contains("same KEK"), "{err}");
    // Even with the id forged to match, the wrong KEK cannot open the blob.
    let blob = blobs.find_key_blob("a").await.unwrap().unwrap();
    let forged = blob.replacen(kek(1).id(), kek(2).id(), 1);
    let err = unseal(&kek(2), "a", &forged).unwrap_err().to_string();
    assert!(err.contains("authentication failed"), "{err}");
}

#[tokio::test]
async fn reads_through_to_file_keys_and_seals_them_into_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let files = FileKeyStore::open(dir.path().join("keys")).unwrap();
    files
        .save("old.key.pem", &KeyPem::new(PEM.into()))
        .await
        .unwrap();
    let blobs = Arc::new(MemoryKeyBlobs::default());
    let store = SealedKeyStore::new(kek(1), blobs.clone()).with_file_fallback(files);
    assert_eq!(store.load("old.key.pem").await.unwrap().expose(), PEM);
    // A replica without that file now loads it from the store.
    let other = SealedKeyStore::new(kek(1), blobs.clone());
    assert_eq!(other.load("old.key.pem").await.unwrap().expose(), PEM);
    // New keys go to the store, not to the data directory.
    store
        .save("new.key.pem", &KeyPem::new(PEM.into()))
        .await
        .unwrap();
    assert!(!dir.path().join("keys").join("new.key.pem").exists());
    assert_eq!(other.load("new.key.pem").await.unwrap().expose(), PEM);
}

#[tokio::test]
async fn open_key_store_refuses_a_bad_kek_file_before_touching_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let path = kek_file(dir.path(), &STANDARD.encode([1u8; 32]), 0o644);
    let Err(err) = open_key_store(
        dir.path(),
        "sqlite:///nonexistent/dir/db",
        Some(&path),
        true,
    )
    .await
    else {
        panic!("a KEK file readable by others was accepted");
    };
    assert!(
        format!("{err:#}").contains("--key-encryption-key-file"),
        "{err:#}"
    );
    assert!(format!("{err:#}").contains("chmod 600"), "{err:#}");
}

//! QUIC Initial packets (RFC 9000, RFC 9001), for the TLS server name of
//! a QUIC connection (issue 14). A client's Initial packets are protected
//! with keys every observer can derive from their Destination Connection
//! ID, so reading their CRYPTO frames (the ClientHello) needs no secret.
//! Only QUIC version 1 is read. The primitives (HKDF, AES-128-GCM, the
//! AES header-protection mask) are ring's, the crate rustls already uses;
//! the packet and frame layout is read here: the maintained QUIC crates
//! (quinn-proto, quiche) do not expose Initial decryption on its own.

use ring::aead::{self, quic as hp, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::hkdf;

/// QUIC version 1's Initial salt (RFC 9001, 5.2).
const INITIAL_SALT_V1: [u8; 20] = [
    0x38, 0x76, 0x2c, 0xf7, 0xf5, 0x59, 0x34, 0xb3, 0x4d, 0x17, 0x9a, 0xe6, 0xa4, 0xc8, 0x0c, 0xad,
    0xcc, 0xbb, 0x7f, 0x0a,
];

/// CRYPTO frames one Initial packet may give, at most.
const FRAMES_MAX: usize = 64;

/// The packet protection keys of a client's Initial packets.
pub struct InitialKeys {
    key: LessSafeKey,
    iv: [u8; 12],
    hp: hp::HeaderProtectionKey,
}

struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

/// HKDF-Expand-Label of TLS 1.3 with an empty context.
fn expand_label(prk: &hkdf::Prk, label: &[u8], out: &mut [u8]) -> Option<()> {
    let len = (out.len() as u16).to_be_bytes();
    let full_len = [(6 + label.len()) as u8];
    let info: [&[u8]; 5] = [&len, &full_len, b"tls13 ", label, &[0]];
    prk.expand(&info, Len(out.len())).ok()?.fill(out).ok()
}

impl InitialKeys {
    /// The client's keys for the Destination Connection ID `dcid`.
    pub fn client(dcid: &[u8]) -> Option<InitialKeys> {
        let initial = hkdf::Salt::new(hkdf::HKDF_SHA256, &INITIAL_SALT_V1).extract(dcid);
        let mut secret = [0u8; 32];
        expand_label(&initial, b"client in", &mut secret)?;
        let client = hkdf::Prk::new_less_safe(hkdf::HKDF_SHA256, &secret);
        let (mut key, mut iv, mut hpk) = ([0u8; 16], [0u8; 12], [0u8; 16]);
        expand_label(&client, b"quic key", &mut key)?;
        expand_label(&client, b"quic iv", &mut iv)?;
        expand_label(&client, b"quic hp", &mut hpk)?;
        Some(InitialKeys {
            key: LessSafeKey::new(UnboundKey::new(&aead::AES_128_GCM, &key).ok()?),
            iv,
            hp: hp::HeaderProtectionKey::new(&hp::AES_128, &hpk).ok()?,
        })
    }
}

/// A variable-length integer (RFC 9000, 16) at `*at`.
fn varint(b: &[u8], at: &mut usize) -> Option<u64> {
    let first = *b.get(*at)?;
    let n = 1usize << (first >> 6);
    let bytes = b.get(*at..*at + n)?;
    let mut v = (first & 0x3f) as u64;
    for x in &bytes[1..] {
        v = (v << 8) | *x as u64;
    }
    *at += n;
    Some(v)
}

/// The Destination Connection ID of a version 1 Initial packet at the
/// start of `datagram`; None for anything else.
pub fn initial_dcid(datagram: &[u8]) -> Option<&[u8]> {
    let first = *datagram.first()?;
    // Long header, fixed bit, type Initial (0); version 1.
    if first & 0xf0 != 0xc0 || datagram.get(1..5)? != [0, 0, 0, 1] {
        return None;
    }
    let len = *datagram.get(5)? as usize;
    if len > 20 {
        return None;
    }
    datagram.get(6..6 + len)
}

/// The CRYPTO frames (offset, data) of the client's Initial packet at the
/// start of `datagram`, decrypted with `keys`.
pub fn initial_crypto(datagram: &[u8], keys: &InitialKeys) -> Option<Vec<(u64, Vec<u8>)>> {
    let dcid = initial_dcid(datagram)?;
    let mut at = 6 + dcid.len();
    let scid_len = *datagram.get(at)? as usize;
    at += 1 + scid_len;
    let token_len = varint(datagram, &mut at)? as usize;
    at = at.checked_add(token_len)?;
    let length = varint(datagram, &mut at)? as usize;
    let pn_at = at;
    let end = pn_at.checked_add(length)?;
    if end > datagram.len() || length < 20 {
        return None;
    }
    // Header protection: the sample starts 4 bytes after the packet
    // number's start.
    let mask = keys
        .hp
        .new_mask(datagram.get(pn_at + 4..pn_at + 20)?)
        .ok()?;
    let mut header = datagram[..pn_at + 4].to_vec();
    header[0] ^= mask[0] & 0x0f;
    let pn_len = (header[0] & 0x03) as usize + 1;
    header.truncate(pn_at + pn_len);
    let mut pn = 0u64;
    for i in 0..pn_len {
        header[pn_at + i] ^= mask[1 + i];
        pn = (pn << 8) | header[pn_at + i] as u64;
    }
    let mut nonce = keys.iv;
    for (i, b) in pn.to_be_bytes().iter().enumerate() {
        nonce[4 + i] ^= b;
    }
    let mut payload = datagram[pn_at + pn_len..end].to_vec();
    let plain = keys
        .key
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(&header[..]),
            &mut payload,
        )
        .ok()?;
    crypto_frames(plain)
}

/// The CRYPTO frames of a decrypted Initial payload. An Initial carries
/// only PADDING, PING, ACK, CRYPTO and CONNECTION_CLOSE frames.
fn crypto_frames(p: &[u8]) -> Option<Vec<(u64, Vec<u8>)>> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < p.len() && out.len() < FRAMES_MAX {
        match varint(p, &mut at)? {
            0x00 | 0x01 => {}
            t @ (0x02 | 0x03) => {
                varint(p, &mut at)?; // largest acknowledged
                varint(p, &mut at)?; // delay
                let ranges = varint(p, &mut at)?;
                varint(p, &mut at)?; // first range
                for _ in 0..ranges.min(256) {
                    varint(p, &mut at)?;
                    varint(p, &mut at)?;
                }
                if t == 0x03 {
                    for _ in 0..3 {
                        varint(p, &mut at)?;
                    }
                }
            }
            0x06 => {
                let off = varint(p, &mut at)?;
                let len = varint(p, &mut at)? as usize;
                let data = p.get(at..at.checked_add(len)?)?;
                at += len;
                out.push((off, data.to_vec()));
            }
            _ => break,
        }
    }
    Some(out)
}

/// The bytes from offset 0 that `chunks` cover without a gap.
pub fn contiguous(chunks: &[(u64, Vec<u8>)], max: usize) -> Vec<u8> {
    let mut out: Vec<u8> = Vec::new();
    loop {
        let have = out.len() as u64;
        let next = chunks
            .iter()
            .filter(|(off, d)| *off <= have && off + d.len() as u64 > have)
            .max_by_key(|(off, d)| off + d.len() as u64);
        let Some((off, d)) = next else {
            return out;
        };
        let from = (have - off) as usize;
        let room = max.saturating_sub(out.len());
        if room == 0 {
            return out;
        }
        out.extend_from_slice(&d[from..d.len().min(from + room)]);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Protects `frames` as a client Initial packet with number `pn`
    /// for `dcid` (what a QUIC client does), padded to 1200 bytes.
    pub(crate) fn client_initial(dcid: &[u8], pn: u8, frames: &[u8]) -> Vec<u8> {
        let keys = InitialKeys::client(dcid).unwrap();
        let mut payload = frames.to_vec();
        let len = 1200 - (7 + dcid.len() + 1 + 2 + 1) - 16;
        payload.resize(len.max(payload.len()), 0);
        let length = payload.len() + 1 + 16;
        let mut h = vec![0xc0, 0, 0, 0, 1, dcid.len() as u8];
        h.extend(dcid);
        h.push(0); // no source connection ID
        h.push(0); // no token
        h.extend(((length as u16) | 0x4000).to_be_bytes());
        let pn_at = h.len();
        h.push(pn);
        let mut nonce = keys.iv;
        nonce[11] ^= pn;
        keys.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&h[..]),
                &mut payload,
            )
            .unwrap();
        let mut pkt = h;
        pkt.extend(&payload);
        let mask = keys.hp.new_mask(&pkt[pn_at + 4..pn_at + 20]).unwrap();
        pkt[0] ^= mask[0] & 0x0f;
        pkt[pn_at] ^= mask[1];
        pkt
    }

    /// A CRYPTO frame at `off` holding `data`.
    pub(crate) fn crypto(off: u16, data: &[u8]) -> Vec<u8> {
        let mut f = vec![0x06];
        f.extend((off | 0x4000).to_be_bytes());
        f.extend((data.len() as u16 | 0x4000).to_be_bytes());
        f.extend(data);
        f
    }

    #[test]
    fn initial_keys_are_rfc_9001s() {
        // RFC 9001, Appendix A.1: the client's keys for 0x8394c8f03e515708.
        let dcid = [0x83, 0x94, 0xc8, 0xf0, 0x3e, 0x51, 0x57, 0x08];
        let initial = hkdf::Salt::new(hkdf::HKDF_SHA256, &INITIAL_SALT_V1).extract(&dcid);
        let mut secret = [0u8; 32];
        expand_label(&initial, b"client in", &mut secret).unwrap();
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        assert_eq!(
            hex(&secret),
            "c00cf151ca5be075ed0ebfb5c80323c42d6b7db67881289af4008f1f6c357aea"
        );
        let client = hkdf::Prk::new_less_safe(hkdf::HKDF_SHA256, &secret);
        let (mut key, mut iv, mut hpk) = ([0u8; 16], [0u8; 12], [0u8; 16]);
        expand_label(&client, b"quic key", &mut key).unwrap();
        expand_label(&client, b"quic iv", &mut iv).unwrap();
        expand_label(&client, b"quic hp", &mut hpk).unwrap();
        assert_eq!(hex(&key), "1f369613dd76d5467730efcbe3b1a22d");
        assert_eq!(hex(&iv), "fa044b2f42a3fd3b46fb255c");
        assert_eq!(hex(&hpk), "9f50449e04a0e810283a1e9933adedd2");
    }

    #[test]
    fn crypto_frames_of_an_initial_packet_in_any_order() {
        let dcid = [7u8; 8];
        let mut frames = crypto(5, b"world");
        frames.extend([0x01, 0x00, 0x00]); // PING, PADDING
        frames.extend(crypto(0, b"hello"));
        let pkt = client_initial(&dcid, 3, &frames);
        assert_eq!(pkt.len(), 1200);
        assert_eq!(initial_dcid(&pkt), Some(&dcid[..]));
        let keys = InitialKeys::client(&dcid).unwrap();
        let chunks = initial_crypto(&pkt, &keys).unwrap();
        assert_eq!(chunks, vec![(5, b"world".to_vec()), (0, b"hello".to_vec())]);
        assert_eq!(contiguous(&chunks, 100), b"helloworld");
        assert_eq!(contiguous(&chunks, 7), b"hellowo");
        // Another connection ID's keys do not open it; a short header or
        // another version is no Initial.
        assert!(initial_crypto(&pkt, &InitialKeys::client(&[8u8; 8]).unwrap()).is_none());
        let mut other = pkt.clone();
        other[4] = 2;
        assert!(initial_dcid(&other).is_none());
        assert!(initial_dcid(&[0x40, 1, 2, 3]).is_none());
        // Cut short: nothing, no panic.
        for n in [0, 5, 20, 100, 1199] {
            assert!(initial_crypto(&pkt[..n], &keys).is_none());
        }
    }
}

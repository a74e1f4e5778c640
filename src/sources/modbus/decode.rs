//! Pure decoding of Modbus registers into numbers, and RTU frame checks. No I/O.
//!
//! A Modbus register is 16 bits sent high byte first. Devices disagree on everything
//! above that: a 32-bit value spans two registers, sent high word first ("big" word
//! order, the Modbus convention) or low word first ("little", common in energy meters);
//! a few devices also swap the bytes inside each register. Both orders are configured
//! per register map entry, so `word_order = "little", byte_order = "little"` reads the
//! fully little-endian layout some PLCs use.

use serde::{Deserialize, Serialize};

/// The type of a value held in registers.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum ValueType {
    #[default]
    U16,
    I16,
    U32,
    I32,
    F32,
}

impl ValueType {
    /// Registers per value.
    pub fn width(self) -> u16 {
        match self {
            ValueType::U16 | ValueType::I16 => 1,
            ValueType::U32 | ValueType::I32 | ValueType::F32 => 2,
        }
    }
}

/// Order of words in a 32-bit value, or of bytes in a register.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Order {
    /// Most significant first (the Modbus convention).
    #[default]
    Big,
    /// Least significant first.
    Little,
}

/// Why registers could not be decoded.
#[derive(Debug, Clone, PartialEq)]
pub enum DecodeError {
    /// The slave sent a different number of registers than asked for.
    WrongCount { expected: usize, found: usize },
    /// An f32 that is NaN or infinite (sensors use these as "no value").
    NotFinite { index: usize },
}

impl DecodeError {
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::WrongCount { .. } => "wrong_register_count",
            DecodeError::NotFinite { .. } => "not_a_number",
        }
    }
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::WrongCount { expected, found } => {
                write!(f, "expected {expected} registers, the slave sent {found}")
            }
            DecodeError::NotFinite { index } => write!(f, "value {index} is NaN or infinite"),
        }
    }
}

/// Decodes `count` values of `ty` from `words`, which must hold exactly
/// `count * ty.width()` registers.
pub fn decode_registers(
    words: &[u16],
    ty: ValueType,
    count: u16,
    word_order: Order,
    byte_order: Order,
) -> Result<Vec<f64>, DecodeError> {
    let width = usize::from(ty.width());
    let expected = usize::from(count) * width;
    if words.len() != expected {
        return Err(DecodeError::WrongCount {
            expected,
            found: words.len(),
        });
    }
    let fix_bytes = |w: u16| match byte_order {
        Order::Big => w,
        Order::Little => w.swap_bytes(),
    };
    words
        .chunks_exact(width)
        .enumerate()
        .map(|(index, chunk)| {
            let value = match ty {
                ValueType::U16 => f64::from(fix_bytes(chunk[0])),
                ValueType::I16 => f64::from(fix_bytes(chunk[0]) as i16),
                ValueType::U32 | ValueType::I32 | ValueType::F32 => {
                    let (hi, lo) = match word_order {
                        Order::Big => (chunk[0], chunk[1]),
                        Order::Little => (chunk[1], chunk[0]),
                    };
                    let bits = (u32::from(fix_bytes(hi)) << 16) | u32::from(fix_bytes(lo));
                    match ty {
                        ValueType::U32 => f64::from(bits),
                        ValueType::I32 => f64::from(bits as i32),
                        _ => f64::from(f32::from_bits(bits)),
                    }
                }
            };
            if value.is_finite() {
                Ok(value)
            } else {
                Err(DecodeError::NotFinite { index })
            }
        })
        .collect()
}

/// Encodes `value` the way [`decode_registers`] reads it (for tests and the test slave).
pub fn encode_value(value: f64, ty: ValueType, word_order: Order, byte_order: Order) -> Vec<u16> {
    let fix_bytes = |w: u16| match byte_order {
        Order::Big => w,
        Order::Little => w.swap_bytes(),
    };
    let bits32 = match ty {
        ValueType::U16 => return vec![fix_bytes(value as u16)],
        ValueType::I16 => return vec![fix_bytes(value as i16 as u16)],
        ValueType::U32 => value as u32,
        ValueType::I32 => value as i32 as u32,
        ValueType::F32 => (value as f32).to_bits(),
    };
    let (hi, lo) = (fix_bytes((bits32 >> 16) as u16), fix_bytes(bits32 as u16));
    match word_order {
        Order::Big => vec![hi, lo],
        Order::Little => vec![lo, hi],
    }
}

/// Coils and discrete inputs as 0 and 1; the slave must send at least `count` bits
/// (they come in whole bytes, so up to 7 more are padding).
pub fn decode_bits(bits: &[bool], count: u16) -> Result<Vec<f64>, DecodeError> {
    let count = usize::from(count);
    if bits.len() < count || bits.len() > count.div_ceil(8) * 8 {
        return Err(DecodeError::WrongCount {
            expected: count,
            found: bits.len(),
        });
    }
    Ok(bits[..count]
        .iter()
        .map(|&b| if b { 1.0 } else { 0.0 })
        .collect())
}

/// The Modbus RTU CRC-16 (polynomial 0xA001, initial 0xFFFF), as sent: low byte first.
pub fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0xFFFF;
    for &byte in data {
        crc ^= u16::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xA001
            } else {
                crc >> 1
            };
        }
    }
    crc
}

/// What went wrong with bytes that did not make a valid answer in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameFault {
    /// Nothing arrived: the slave is silent (or absent).
    NoAnswer,
    /// A frame of the right size arrived with a wrong CRC (noise, wiring, termination).
    CrcError,
    /// Fewer bytes than a frame arrived.
    Truncated,
    /// A valid frame arrived that was not the answer (another slave, a late answer).
    Unexpected,
}

impl FrameFault {
    pub fn reason(self) -> &'static str {
        match self {
            FrameFault::NoAnswer => "no_answer",
            FrameFault::CrcError => "crc_error",
            FrameFault::Truncated => "truncated_frame",
            FrameFault::Unexpected => "unexpected_frame",
        }
    }
}

/// Classifies what a slave sent before a request timed out. `expected_len` is the
/// length of a normal answer (an exception answer is 5 bytes).
pub fn classify_timeout(received: &[u8], expected_len: usize) -> FrameFault {
    if received.is_empty() {
        return FrameFault::NoAnswer;
    }
    let len = match received.get(1) {
        Some(function) if function & 0x80 != 0 => 5,
        _ => expected_len,
    };
    if received.len() < len || len < 4 {
        return FrameFault::Truncated;
    }
    let frame = &received[..len];
    let crc = u16::from_le_bytes([frame[len - 2], frame[len - 1]]);
    if crc16(&frame[..len - 2]) != crc {
        FrameFault::CrcError
    } else {
        FrameFault::Unexpected
    }
}

/// Length of a normal answer to a read of `quantity` registers (functions 3, 4) or
/// bits (functions 1, 2): address, function, byte count, data, CRC.
pub fn answer_len(function: u8, quantity: u16) -> usize {
    let data = match function {
        1 | 2 => usize::from(quantity).div_ceil(8),
        _ => usize::from(quantity) * 2,
    };
    3 + data + 2
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORDERS: [(Order, Order); 4] = [
        (Order::Big, Order::Big),
        (Order::Little, Order::Big),
        (Order::Big, Order::Little),
        (Order::Little, Order::Little),
    ];

    #[test]
    fn known_layouts() {
        // 123456789 = 0x075BCD15.
        let d = |w: &[u16], wo, bo| decode_registers(w, ValueType::U32, 1, wo, bo).unwrap()[0];
        assert_eq!(d(&[0x075B, 0xCD15], Order::Big, Order::Big), 123_456_789.0);
        assert_eq!(
            d(&[0xCD15, 0x075B], Order::Little, Order::Big),
            123_456_789.0
        );
        assert_eq!(
            d(&[0x5B07, 0x15CD], Order::Big, Order::Little),
            123_456_789.0
        );
        assert_eq!(
            d(&[0x15CD, 0x5B07], Order::Little, Order::Little),
            123_456_789.0
        );
        // -1.5f32 = 0xBFC00000.
        let f =
            decode_registers(&[0xBFC0, 0x0000], ValueType::F32, 1, Order::Big, Order::Big).unwrap();
        assert_eq!(f, vec![-1.5]);
        let i =
            decode_registers(&[0xFFFE, 0x8000], ValueType::I16, 2, Order::Big, Order::Big).unwrap();
        assert_eq!(i, vec![-2.0, -32768.0]);
        let i32v =
            decode_registers(&[0xFFFF, 0xFFFF], ValueType::I32, 1, Order::Big, Order::Big).unwrap();
        assert_eq!(i32v, vec![-1.0]);
    }

    #[test]
    fn round_trips_every_type_and_order() {
        let cases = [
            (ValueType::U16, 65535.0),
            (ValueType::I16, -1234.0),
            (ValueType::U32, 4_000_000_000.0),
            (ValueType::I32, -2_000_000_000.0),
            (ValueType::F32, 21.5),
        ];
        for (ty, v) in cases {
            for (wo, bo) in ORDERS {
                let words = encode_value(v, ty, wo, bo);
                assert_eq!(words.len(), usize::from(ty.width()));
                assert_eq!(
                    decode_registers(&words, ty, 1, wo, bo).unwrap(),
                    vec![v],
                    "{ty:?} {wo:?} {bo:?}"
                );
            }
        }
    }

    #[test]
    fn wrong_counts_and_nan() {
        let e =
            decode_registers(&[1, 2, 3], ValueType::F32, 2, Order::Big, Order::Big).unwrap_err();
        assert_eq!(e.reason(), "wrong_register_count");
        assert!(decode_registers(&[], ValueType::U16, 1, Order::Big, Order::Big).is_err());
        let nan = encode_value(f64::NAN, ValueType::F32, Order::Big, Order::Big);
        let e = decode_registers(&nan, ValueType::F32, 1, Order::Big, Order::Big).unwrap_err();
        assert_eq!(e.reason(), "not_a_number");
        assert_eq!(
            decode_bits(&[true, false, true, false, false, false, false, false], 3).unwrap(),
            vec![1.0, 0.0, 1.0]
        );
        assert!(decode_bits(&[true], 3).is_err());
        assert!(
            decode_bits(&[false; 16], 3).is_err(),
            "more than one byte of padding"
        );
    }

    #[test]
    fn crc_and_timeout_classification() {
        // Read holding registers answer from slave 1, one register 0x0001.
        let mut frame = vec![0x01, 0x03, 0x02, 0x00, 0x01];
        let crc = crc16(&frame);
        frame.extend_from_slice(&crc.to_le_bytes());
        assert_eq!(
            crc16(&[0x01, 0x03, 0x00, 0x00, 0x00, 0x01]),
            0x0A84,
            "the textbook request"
        );
        assert_eq!(answer_len(3, 1), 7);
        assert_eq!(answer_len(1, 9), 7);
        assert_eq!(classify_timeout(&[], 7), FrameFault::NoAnswer);
        assert_eq!(classify_timeout(&frame[..4], 7), FrameFault::Truncated);
        let mut bad = frame.clone();
        bad[4] ^= 0x40;
        assert_eq!(classify_timeout(&bad, 7), FrameFault::CrcError);
        assert_eq!(classify_timeout(&[0xff; 3], 7), FrameFault::Truncated);
        assert_eq!(classify_timeout(&frame[..6], 7), FrameFault::Truncated);
        assert_eq!(classify_timeout(&frame, 7), FrameFault::Unexpected);
        assert_eq!(
            classify_timeout(&[0x01, 0x83, 0x02, 0x00, 0x00], 7),
            FrameFault::CrcError
        );
    }
}

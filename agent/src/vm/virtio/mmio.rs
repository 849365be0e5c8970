//! The virtio-mmio register file, version 2 (virtio 1.x, section 4.2.2): identification, feature
//! negotiation, queue setup, status, interrupt status/ACK and the device's config space.
//!
//! Registers are 32 bits wide and accessed 32-bit aligned; the config space (from 0x100) may be
//! read at any width. A write the spec does not allow (a queue register while the queue is
//! ready, a feature word after FEATURES_OK) is ignored, as hardware would.

use serde::{Deserialize, Serialize};

use super::queue::{QueueState, QUEUE_MAX};

pub const MAGIC: u32 = 0x7472_6976; // "virt"
pub const VERSION: u32 = 2;
/// "FRRY".
pub const VENDOR: u32 = u32::from_le_bytes(*b"FRRY");

pub const DEVICE_NET: u32 = 1;
pub const DEVICE_BLK: u32 = 2;

/// VIRTIO_F_VERSION_1: the only transport feature offered, and required.
pub const F_VERSION_1: u64 = 1 << 32;

pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_NEEDS_RESET: u32 = 64;
pub const STATUS_FAILED: u32 = 128;

/// InterruptStatus bit: the device used buffers.
pub const INT_USED: u32 = 1;
/// InterruptStatus bit: the config space changed.
pub const INT_CONFIG: u32 = 2;

pub const REG_MAGIC: u64 = 0x000;
pub const REG_VERSION: u64 = 0x004;
pub const REG_DEVICE_ID: u64 = 0x008;
pub const REG_VENDOR_ID: u64 = 0x00c;
pub const REG_DEVICE_FEATURES: u64 = 0x010;
pub const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
pub const REG_DRIVER_FEATURES: u64 = 0x020;
pub const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
pub const REG_QUEUE_SEL: u64 = 0x030;
pub const REG_QUEUE_NUM_MAX: u64 = 0x034;
pub const REG_QUEUE_NUM: u64 = 0x038;
pub const REG_QUEUE_READY: u64 = 0x044;
pub const REG_QUEUE_NOTIFY: u64 = 0x050;
pub const REG_INTERRUPT_STATUS: u64 = 0x060;
pub const REG_INTERRUPT_ACK: u64 = 0x064;
pub const REG_STATUS: u64 = 0x070;
pub const REG_QUEUE_DESC_LOW: u64 = 0x080;
pub const REG_QUEUE_DESC_HIGH: u64 = 0x084;
pub const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
pub const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
pub const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
pub const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
pub const REG_CONFIG_GENERATION: u64 = 0x0fc;
pub const REG_CONFIG: u64 = 0x100;

/// The transport's state: everything the driver negotiated and set up.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportState {
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub status: u32,
    pub queue_sel: u32,
    pub interrupt_status: u32,
    pub config_generation: u32,
    pub queues: Vec<QueueState>,
}

/// What a register write asks of the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    None,
    /// The driver notified queue `n`.
    Notify(u16),
    /// The driver wrote 0 to Status: the device must forget its queues.
    Reset,
    /// The driver set DRIVER_OK.
    DriverOk,
}

/// A virtio-mmio transport for one device.
#[derive(Debug, Clone)]
pub struct Transport {
    pub device_id: u32,
    /// Features the device offers (VERSION_1 is added).
    pub device_features: u64,
    pub st: TransportState,
}

/// Saved transport state that does not fit this device.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransportMismatch {
    #[error("{saved} queues saved, the device has {here}")]
    Queues { saved: usize, here: usize },
    #[error("negotiated features {negotiated:#x} are not all offered here ({offered:#x})")]
    Features { negotiated: u64, offered: u64 },
    #[error("a saved queue has an invalid size")]
    QueueSize,
}

impl Transport {
    pub fn new(device_id: u32, device_features: u64, queues: usize) -> Transport {
        Transport {
            device_id,
            device_features: device_features | F_VERSION_1,
            st: TransportState {
                queues: vec![QueueState::default(); queues],
                ..Default::default()
            },
        }
    }

    pub fn driver_ok(&self) -> bool {
        self.st.status & STATUS_DRIVER_OK != 0 && self.st.status & STATUS_FAILED == 0
    }

    pub fn queue(&mut self, i: usize) -> Option<&mut QueueState> {
        self.st.queues.get_mut(i)
    }

    fn selected(&mut self) -> Option<&mut QueueState> {
        let i = self.st.queue_sel as usize;
        self.st.queues.get_mut(i)
    }

    fn reset(&mut self) {
        let n = self.st.queues.len();
        self.st = TransportState {
            queues: vec![QueueState::default(); n],
            config_generation: self.st.config_generation,
            ..Default::default()
        };
    }

    /// Load saved state (checked against this device's shape).
    pub fn restore(&mut self, st: &TransportState) -> Result<(), TransportMismatch> {
        if st.queues.len() != self.st.queues.len() {
            return Err(TransportMismatch::Queues {
                saved: st.queues.len(),
                here: self.st.queues.len(),
            });
        }
        if st.driver_features & !self.device_features != 0 {
            return Err(TransportMismatch::Features {
                negotiated: st.driver_features,
                offered: self.device_features,
            });
        }
        if st
            .queues
            .iter()
            .any(|q| q.size > QUEUE_MAX || (q.size != 0 && !q.size.is_power_of_two()))
        {
            return Err(TransportMismatch::QueueSize);
        }
        self.st = st.clone();
        Ok(())
    }

    /// A read at `offset` within the window; `config` is the device's config space.
    pub fn read(&self, offset: u64, data: &mut [u8], config: &[u8]) {
        data.fill(0);
        if offset >= REG_CONFIG {
            let start = (offset - REG_CONFIG) as usize;
            for (k, b) in data.iter_mut().enumerate() {
                *b = config.get(start + k).copied().unwrap_or(0);
            }
            return;
        }
        let q = self.st.queues.get(self.st.queue_sel as usize);
        let v: u32 = match offset {
            REG_MAGIC => MAGIC,
            REG_VERSION => VERSION,
            REG_DEVICE_ID => self.device_id,
            REG_VENDOR_ID => VENDOR,
            REG_DEVICE_FEATURES => match self.st.device_features_sel {
                0 => self.device_features as u32,
                1 => (self.device_features >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX if q.is_some() => u32::from(QUEUE_MAX),
            REG_QUEUE_READY => q.map_or(0, |q| u32::from(q.ready)),
            REG_INTERRUPT_STATUS => self.st.interrupt_status,
            REG_STATUS => self.st.status,
            REG_CONFIG_GENERATION => self.st.config_generation,
            _ => 0,
        };
        let b = v.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&b[..n]);
    }

    /// A write at `offset` within the window.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Event {
        if offset >= REG_CONFIG {
            // Config spaces here are read-only for the driver.
            return Event::None;
        }
        let mut b = [0u8; 4];
        let n = data.len().min(4);
        b[..n].copy_from_slice(&data[..n]);
        let v = u32::from_le_bytes(b);
        let setting_up = self.st.status & STATUS_FEATURES_OK == 0;
        match offset {
            REG_DEVICE_FEATURES_SEL => self.st.device_features_sel = v,
            REG_DRIVER_FEATURES_SEL => self.st.driver_features_sel = v,
            REG_DRIVER_FEATURES if setting_up => match self.st.driver_features_sel {
                0 => {
                    self.st.driver_features =
                        (self.st.driver_features & !0xffff_ffff) | u64::from(v)
                }
                1 => {
                    self.st.driver_features =
                        (self.st.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                }
                _ => {}
            },
            REG_QUEUE_SEL => self.st.queue_sel = v,
            REG_QUEUE_NUM => {
                if let Some(q) = self.selected().filter(|q| !q.ready) {
                    // Sizes must be powers of two no larger than QueueNumMax; anything else
                    // leaves the queue unusable (size 0) so QueueReady cannot turn it on.
                    q.size = if v > 0 && v <= u32::from(QUEUE_MAX) && v.is_power_of_two() {
                        v as u16
                    } else {
                        0
                    };
                }
            }
            REG_QUEUE_READY => {
                if let Some(q) = self.selected() {
                    if v == 0 {
                        q.ready = false;
                    } else if q.size > 0 {
                        q.ready = true;
                    }
                }
            }
            REG_QUEUE_DESC_LOW
            | REG_QUEUE_DESC_HIGH
            | REG_QUEUE_DRIVER_LOW
            | REG_QUEUE_DRIVER_HIGH
            | REG_QUEUE_DEVICE_LOW
            | REG_QUEUE_DEVICE_HIGH => {
                if let Some(q) = self.selected().filter(|q| !q.ready) {
                    let field = match offset {
                        REG_QUEUE_DESC_LOW | REG_QUEUE_DESC_HIGH => &mut q.desc,
                        REG_QUEUE_DRIVER_LOW | REG_QUEUE_DRIVER_HIGH => &mut q.avail,
                        _ => &mut q.used,
                    };
                    if offset & 4 == 0 {
                        *field = (*field & !0xffff_ffff) | u64::from(v);
                    } else {
                        *field = (*field & 0xffff_ffff) | (u64::from(v) << 32);
                    }
                }
            }
            REG_QUEUE_NOTIFY if (v as usize) < self.st.queues.len() => {
                return Event::Notify(v as u16);
            }
            REG_INTERRUPT_ACK => self.st.interrupt_status &= !v,
            REG_STATUS => return self.write_status(v),
            _ => {}
        }
        Event::None
    }

    fn write_status(&mut self, v: u32) -> Event {
        if v == 0 {
            self.reset();
            return Event::Reset;
        }
        let old = self.st.status;
        let mut v = v;
        if v & STATUS_FEATURES_OK != 0 && old & STATUS_FEATURES_OK == 0 {
            // FEATURES_OK sticks only for a subset of what is offered that includes VERSION_1
            // (this device does not speak the legacy interface).
            let ok = self.st.driver_features & !self.device_features == 0
                && self.st.driver_features & F_VERSION_1 != 0;
            if !ok {
                v &= !STATUS_FEATURES_OK;
            }
        }
        self.st.status = v;
        if v & STATUS_DRIVER_OK != 0 && old & STATUS_DRIVER_OK == 0 {
            return Event::DriverOk;
        }
        Event::None
    }

    /// The device used buffers: raise the interrupt status.
    pub fn signal_used(&mut self) {
        self.st.interrupt_status |= INT_USED;
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn w(t: &mut Transport, off: u64, v: u32) -> Event {
        t.write(off, &v.to_le_bytes())
    }
    pub fn r(t: &Transport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b, &[]);
        u32::from_le_bytes(b)
    }

    /// What a driver does to bring a device up with `features` and the given queues.
    pub fn bring_up(t: &mut Transport, features: u64, queues: &[QueueState]) -> u32 {
        w(t, REG_STATUS, 0);
        w(t, REG_STATUS, STATUS_ACKNOWLEDGE);
        w(t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w(t, REG_DRIVER_FEATURES_SEL, 0);
        w(t, REG_DRIVER_FEATURES, features as u32);
        w(t, REG_DRIVER_FEATURES_SEL, 1);
        w(t, REG_DRIVER_FEATURES, (features >> 32) as u32);
        w(
            t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        let st = r(t, REG_STATUS);
        if st & STATUS_FEATURES_OK == 0 {
            return st;
        }
        for (i, q) in queues.iter().enumerate() {
            w(t, REG_QUEUE_SEL, i as u32);
            assert_eq!(r(t, REG_QUEUE_NUM_MAX), u32::from(QUEUE_MAX));
            w(t, REG_QUEUE_NUM, u32::from(q.size));
            w(t, REG_QUEUE_DESC_LOW, q.desc as u32);
            w(t, REG_QUEUE_DESC_HIGH, (q.desc >> 32) as u32);
            w(t, REG_QUEUE_DRIVER_LOW, q.avail as u32);
            w(t, REG_QUEUE_DRIVER_HIGH, (q.avail >> 32) as u32);
            w(t, REG_QUEUE_DEVICE_LOW, q.used as u32);
            w(t, REG_QUEUE_DEVICE_HIGH, (q.used >> 32) as u32);
            w(t, REG_QUEUE_READY, 1);
        }
        w(
            t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        r(t, REG_STATUS)
    }

    #[test]
    fn identification_and_features() {
        let t = Transport::new(DEVICE_NET, 1 << 5, 2);
        assert_eq!(r(&t, REG_MAGIC), MAGIC);
        assert_eq!(r(&t, REG_VERSION), 2);
        assert_eq!(r(&t, REG_DEVICE_ID), DEVICE_NET);
        let mut t = t;
        w(&mut t, REG_DEVICE_FEATURES_SEL, 0);
        assert_eq!(r(&t, REG_DEVICE_FEATURES), 1 << 5);
        w(&mut t, REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&t, REG_DEVICE_FEATURES), 1); // VERSION_1
                                                   // Config space reads at any width, zero past its end.
        let mut b = [0u8; 4];
        t.read(REG_CONFIG + 2, &mut b, &[1, 2, 3, 4, 5]);
        assert_eq!(b, [3, 4, 5, 0]);
    }

    #[test]
    fn negotiation_refuses_legacy_and_unoffered_features() {
        let q = QueueState {
            size: 8,
            desc: 0x1000,
            avail: 0x2000,
            used: 0x3000,
            ..Default::default()
        };
        let mut t = Transport::new(DEVICE_BLK, 1 << 9, 1);
        // Without VERSION_1: FEATURES_OK does not stick.
        assert_eq!(bring_up(&mut t, 1 << 9, &[q]) & STATUS_FEATURES_OK, 0);
        // A feature not offered: refused too.
        assert_eq!(
            bring_up(&mut t, F_VERSION_1 | 1 << 9 | 1 << 3, &[q]) & STATUS_FEATURES_OK,
            0
        );
        let st = bring_up(&mut t, F_VERSION_1 | 1 << 9, &[q]);
        assert_ne!(st & STATUS_DRIVER_OK, 0);
        assert!(t.driver_ok());
        let got = t.st.queues[0];
        assert!(got.ready);
        assert_eq!(
            (got.size, got.desc, got.avail, got.used),
            (8, 0x1000, 0x2000, 0x3000)
        );
        // Features are frozen after FEATURES_OK; queue addresses while ready too.
        w(&mut t, REG_DRIVER_FEATURES_SEL, 0);
        w(&mut t, REG_DRIVER_FEATURES, 0);
        assert_eq!(t.st.driver_features, F_VERSION_1 | 1 << 9);
        w(&mut t, REG_QUEUE_SEL, 0);
        w(&mut t, REG_QUEUE_DESC_LOW, 0x9000);
        assert_eq!(t.st.queues[0].desc, 0x1000);
        // Notify of an existing queue is an event; of a missing one nothing.
        assert_eq!(w(&mut t, REG_QUEUE_NOTIFY, 0), Event::Notify(0));
        assert_eq!(w(&mut t, REG_QUEUE_NOTIFY, 5), Event::None);
        // Interrupt status and ACK.
        t.signal_used();
        assert_eq!(r(&t, REG_INTERRUPT_STATUS), INT_USED);
        w(&mut t, REG_INTERRUPT_ACK, INT_USED);
        assert_eq!(r(&t, REG_INTERRUPT_STATUS), 0);
        // Reset forgets everything.
        assert_eq!(w(&mut t, REG_STATUS, 0), Event::Reset);
        assert_eq!(t.st.queues[0], QueueState::default());
        assert!(!t.driver_ok());
    }

    #[test]
    fn bad_queue_sizes_cannot_be_made_ready() {
        let mut t = Transport::new(DEVICE_NET, 0, 2);
        w(&mut t, REG_QUEUE_SEL, 1);
        w(&mut t, REG_QUEUE_NUM, 3);
        w(&mut t, REG_QUEUE_READY, 1);
        assert_eq!(r(&t, REG_QUEUE_READY), 0);
        w(&mut t, REG_QUEUE_NUM, 1024);
        w(&mut t, REG_QUEUE_READY, 1);
        assert_eq!(r(&t, REG_QUEUE_READY), 0);
        // A queue index past the device reads as absent.
        w(&mut t, REG_QUEUE_SEL, 7);
        assert_eq!(r(&t, REG_QUEUE_NUM_MAX), 0);
        w(&mut t, REG_QUEUE_READY, 1);
    }

    #[test]
    fn restore_checks_shape() {
        let mut t = Transport::new(DEVICE_NET, 1 << 5, 2);
        let mut st = t.st.clone();
        st.driver_features = F_VERSION_1 | 1 << 5;
        st.status = 0xf;
        assert!(t.restore(&st).is_ok());
        assert_eq!(t.st, st);
        st.driver_features |= 1 << 7;
        assert!(t.restore(&st).is_err());
        st.driver_features = 0;
        st.queues.pop();
        assert!(t.restore(&st).is_err());
    }
}

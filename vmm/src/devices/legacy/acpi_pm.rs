//! The hardware-reduced ACPI sleep and reset registers the FADT points at.
//!
//! Linux powers off by writing SLP_TYPx=5 | SLP_EN to the sleep control
//! register, and resets by writing the FADT's reset value to the reset
//! register; both arrive here as port I/O.

/// Offsets from `layout::PM_IO_BASE`.
pub const SLEEP_CONTROL: u16 = 0;
pub const SLEEP_STATUS: u16 = 1;
pub const RESET: u16 = 4;
/// The value the FADT tells the OS to write to `RESET`.
pub const RESET_VALUE: u8 = 1;
/// The S5 sleep type the DSDT's `_S5_` package names.
pub const S5_SLEEP_TYPE: u8 = 5;
const SLP_EN: u8 = 1 << 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerEvent {
    PowerOff,
    Reset,
}

#[derive(Debug, Default)]
pub struct AcpiPmDevice;

impl AcpiPmDevice {
    pub fn read(&mut self, _offset: u16, data: &mut [u8]) {
        // Sleep status reads as "not woken"; nothing else is readable.
        data.fill(0);
    }

    pub fn write(&mut self, offset: u16, data: &[u8]) -> Option<PowerEvent> {
        let v = *data.first()?;
        match offset {
            SLEEP_CONTROL if v & SLP_EN != 0 && (v >> 2) & 0x7 == S5_SLEEP_TYPE => {
                Some(PowerEvent::PowerOff)
            }
            RESET if v == RESET_VALUE => Some(PowerEvent::Reset),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s5_with_slp_en_powers_off() {
        let mut d = AcpiPmDevice;
        assert_eq!(
            d.write(SLEEP_CONTROL, &[(5 << 2) | SLP_EN]),
            Some(PowerEvent::PowerOff)
        );
        // Sleep type without SLP_EN, or another sleep state: nothing happens.
        assert_eq!(d.write(SLEEP_CONTROL, &[5 << 2]), None);
        assert_eq!(d.write(SLEEP_CONTROL, &[(3 << 2) | SLP_EN]), None);
        assert_eq!(d.write(SLEEP_CONTROL, &[]), None);
    }

    #[test]
    fn reset_register() {
        let mut d = AcpiPmDevice;
        assert_eq!(d.write(RESET, &[1]), Some(PowerEvent::Reset));
        assert_eq!(d.write(RESET, &[2]), None);
        assert_eq!(d.write(SLEEP_STATUS, &[1]), None);
        let mut b = [0xff; 1];
        d.read(SLEEP_STATUS, &mut b);
        assert_eq!(b, [0]);
    }
}

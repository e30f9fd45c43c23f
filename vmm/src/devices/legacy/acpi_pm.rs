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
        // WAK_STS stays clear: after writing SLP_EN, ACPICA polls it until a
        // wake, but by then the VMM has acted on the power-off and stopped
        // the vCPUs. No other register has state worth reading.
        data.fill(0);
    }

    /// The FADT declares every register 8 bits wide, so only the first byte
    /// of a wider access counts.
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
        // What ACPICA's acpi_hw_extended_sleep() writes for S5.
        assert_eq!(d.write(SLEEP_CONTROL, &[0x34]), Some(PowerEvent::PowerOff));
        // Bits outside SLP_TYP/SLP_EN do not matter.
        assert_eq!(
            d.write(SLEEP_CONTROL, &[0x34 | 0xc3]),
            Some(PowerEvent::PowerOff)
        );
        // Sleep type without SLP_EN, or another sleep state: nothing happens.
        assert_eq!(d.write(SLEEP_CONTROL, &[5 << 2]), None);
        for typ in (0..8).filter(|t| *t != S5_SLEEP_TYPE) {
            assert_eq!(d.write(SLEEP_CONTROL, &[(typ << 2) | SLP_EN]), None);
        }
        assert_eq!(d.write(SLEEP_CONTROL, &[]), None);
    }

    #[test]
    fn reset_register() {
        let mut d = AcpiPmDevice;
        assert_eq!(d.write(RESET, &[RESET_VALUE]), Some(PowerEvent::Reset));
        assert_eq!(d.write(RESET, &[0]), None);
        assert_eq!(d.write(RESET, &[2]), None);
        assert_eq!(d.write(RESET, &[]), None);
    }

    #[test]
    fn other_registers_are_harmless() {
        let mut d = AcpiPmDevice;
        // ACPICA clears WAK_STS before sleeping by writing it back.
        assert_eq!(d.write(SLEEP_STATUS, &[0x80]), None);
        for off in [2, 3, 5, 6, 7, 0xffff] {
            assert_eq!(d.write(off, &[0x34]), None, "offset {off}");
            assert_eq!(d.write(off, &[1]), None, "offset {off}");
        }
        // Reset value at the sleep control register, S5 at the reset one.
        assert_eq!(d.write(SLEEP_CONTROL, &[RESET_VALUE]), None);
        assert_eq!(d.write(RESET, &[0x34]), None);
    }

    #[test]
    fn reads_return_zero() {
        let mut d = AcpiPmDevice;
        for off in 0..8 {
            let mut b = [0xffu8; 4];
            d.read(off, &mut b[..1]);
            assert_eq!(b, [0, 0xff, 0xff, 0xff], "offset {off}");
            d.read(off, &mut b);
            assert_eq!(b, [0; 4], "offset {off}");
        }
    }
}

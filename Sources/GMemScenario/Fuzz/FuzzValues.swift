/// A small, fast, seedable generator (SplitMix64): the same seed gives the same
/// sequence on every machine, so a campaign's seeds are its reproducers.
public struct FuzzRNG: RandomNumberGenerator, Sendable {
    public private(set) var state: UInt64
    public init(seed: UInt64) { state = seed }
    public mutating func next() -> UInt64 {
        state &+= 0x9e37_79b9_7f4a_7c15
        var z = state
        z = (z ^ (z >> 30)) &* 0xbf58_476d_1ce4_e5b9
        z = (z ^ (z >> 27)) &* 0x94d0_49bb_1331_11eb
        return z ^ (z >> 31)
    }

    /// The seed of sequence `index` of a campaign started with `seed`.
    public static func sequenceSeed(campaign seed: UInt64, index: Int) -> UInt64 {
        var r = FuzzRNG(seed: seed ^ (UInt64(index) &* 0xd134_2543_de82_ef95))
        return r.next()
    }
}

/// The numbers the fuzzer draws: mostly ones a VMM would pass, often the boundaries
/// where the kernel's checks live (0, unaligned, 2^47, 2^63, negative as loff_t,
/// wrapping).
enum FuzzValues {
    static let page: UInt64 = 4096
    static let boundaries: [UInt64] = [
        0, 1, 100, 4095, 4097, 1 << 21, (1 << 21) + 4096, 1 << 30, (1 << 47) - 4096, 1 << 47, 1 << 48, 1 << 52,
        1 << 62, (1 << 63) - 4096, 1 << 63, 0x7fff_ffff_ffff_f000, 0 &- 4096, 0 &- 1, 1 << 43,
    ]

    /// A byte count or length: small page multiples mostly, then 0, unaligned and boundaries.
    static func length(_ r: inout FuzzRNG, pages: UInt64 = 16) -> UInt64 {
        switch r.next() % 20 {
        case 0: return 0
        case 1, 2: return [1, 100, 4095, 4097, 8191][Int(r.next() % 5)]
        case 3, 4: return boundaries[Int(r.next() % UInt64(boundaries.count))]
        default: return (1 + r.next() % pages) * page
        }
    }

    /// An offset into an object of `size` bytes: inside, at its end, past it, unaligned
    /// or a boundary.
    static func offset(_ r: inout FuzzRNG, within size: UInt64) -> UInt64 {
        let pages = max(size / page, 1)
        switch r.next() % 16 {
        case 0: return size
        case 1: return size &+ page
        case 2: return size &- page
        case 3: return [1, 100, 2048, 4095][Int(r.next() % 4)]
        case 4: return boundaries[Int(r.next() % UInt64(boundaries.count))]
        case 5, 6, 7: return 0
        default: return (r.next() % pages) * page
        }
    }

    /// A size for a new guest_memfd or memfd.
    static func fileSize(_ r: inout FuzzRNG) -> UInt64 {
        switch r.next() % 10 {
        case 0: return boundaries[Int(r.next() % UInt64(boundaries.count))]
        case 1: return [1 << 40, 1 << 30, 12288][Int(r.next() % 3)]
        case 2, 3: return [4096, 8192][Int(r.next() % 2)]
        default: return [16384, 65536, 1 << 21][Int(r.next() % 3)]
        }
    }

    static func hex(_ v: UInt64) -> JSON { .string("0x" + String(v, radix: 16)) }

    static func pick<T>(_ r: inout FuzzRNG, _ items: [T]) -> T { items[Int(r.next() % UInt64(items.count))] }

    static func chance(_ r: inout FuzzRNG, _ percent: UInt64) -> Bool { r.next() % 100 < percent }

    /// A short byte string with a recognisable pattern.
    static func bytes(_ r: inout FuzzRNG, max: UInt64 = 64) -> JSON {
        let n = 1 + r.next() % max
        let b = UInt8(truncatingIfNeeded: r.next() | 1)
        if n <= 8 {
            return .string((0..<n).map { i in String(format2: b &+ UInt8(i)) }.joined())
        }
        return .object(JSONObject(["pattern": .string(String(format2: b) + String(format2: b ^ 0xff)), "len": .int(n)]))
    }
}

extension String {
    /// Two lower-case hex digits.
    init(format2 b: UInt8) {
        let s = String(b, radix: 16)
        self = s.count == 1 ? "0" + s : s
    }
}

/// Numbers in scenario files: JSON integers, or strings holding a small expression.
///
///     4096   "4096"   "0xC0000000"   "4K" "2M" "1G" "1T" (binary units; also P, E)
///     "2^63"   "1G+4K"   "4*2M"   "-4096"   "2^64-4K"
///
/// Arithmetic is modulo 2^64, like the u64 fields it fills: "-4096" is
/// 0xfffffffffffff000, which is how a scenario passes a negative loff_t.
public enum NumberSyntax {
    public static func parse(_ json: JSON) -> UInt64? {
        switch json {
        case .number(let text): return parse(text)
        case .string(let text): return parse(text)
        default: return nil
        }
    }

    /// The longest number expression read (a guard on the parser's work, not a syntax rule).
    public static let maxLength = 256

    public static func parse(_ text: String) -> UInt64? {
        guard text.utf8.count <= maxLength else { return nil }
        var p = Parser(chars: Array(text.unicodeScalars.filter { $0 != " " && $0 != "_" }))
        guard !p.chars.isEmpty, let v = p.sum(), p.i == p.chars.count else { return nil }
        return v
    }

    struct Parser {
        let chars: [Unicode.Scalar]
        var i = 0
        var peek: Unicode.Scalar? { i < chars.count ? chars[i] : nil }

        mutating func sum() -> UInt64? {
            guard var v = product() else { return nil }
            while let c = peek, c == "+" || c == "-" {
                i += 1
                guard let r = product() else { return nil }
                v = c == "+" ? v &+ r : v &- r
            }
            return v
        }

        mutating func product() -> UInt64? {
            guard var v = unary() else { return nil }
            while peek == "*" {
                i += 1
                guard let r = unary() else { return nil }
                v = v &* r
            }
            return v
        }

        mutating func unary() -> UInt64? {
            // Any run of minus signs, without recursion (no input can exhaust the stack).
            var negate = false
            while peek == "-" {
                i += 1
                negate.toggle()
            }
            return atom().map { negate ? 0 &- $0 : $0 }
        }

        /// Decimal digits only (a number's digits, an exponent); nil on overflow.
        mutating func plainNumber() -> UInt64? {
            var v: UInt64 = 0
            var digits = 0
            while let c = peek, let d = c.decimalDigitValue {
                let (m, o) = v.multipliedReportingOverflow(by: 10)
                let (s, o2) = m.addingReportingOverflow(UInt64(d))
                if o || o2 { return nil }
                v = s
                digits += 1
                i += 1
            }
            return digits == 0 ? nil : v
        }

        mutating func atom() -> UInt64? {
            guard let first = peek, first.properties.numericType != nil || first == "0" else { return nil }
            var v: UInt64 = 0
            if first == "0", i + 1 < chars.count, chars[i + 1] == "x" || chars[i + 1] == "X" {
                i += 2
                var digits = 0
                while let c = peek, let d = c.hexDigitValue {
                    let (m, o) = v.multipliedReportingOverflow(by: 16)
                    if o { return nil }
                    v = m + UInt64(d)
                    digits += 1
                    i += 1
                }
                if digits == 0 { return nil }
            } else {
                guard let n = plainNumber() else { return nil }
                v = n
            }
            if peek == "^" {
                i += 1
                // The exponent is a plain number: "2^2^2" is not an expression (no recursion).
                guard peek != "^", let e = plainNumber(), e < 128 else { return nil }
                var r: UInt64 = 1
                for _ in 0..<e { r = r &* v }
                return r
            }
            let units: [Unicode.Scalar: UInt64] = [
                "K": 10, "M": 20, "G": 30, "T": 40, "P": 50, "E": 60, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60,
            ]
            if let c = peek, let shift = units[c] {
                i += 1
                if peek == "i" || peek == "B" { i += 1 }  // "4KiB", "4KB" read as 4K too
                if peek == "B" { i += 1 }
                return v &<< shift
            }
            return v
        }
    }
}

extension Unicode.Scalar {
    var hexDigitValue: Int? { Character(self).hexDigitValue }
    var decimalDigitValue: Int? {
        (48...57).contains(value) ? Int(value - 48) : nil
    }
}

/// Byte strings in scenario files:
///
///     "aa55"                                   hex
///     {"fill": "0xaa", "len": 4096}            one byte repeated
///     {"pattern": "deadbeef", "len": "8K"}     a hex pattern repeated to len
///     {"text": "hello"}                        UTF-8 text
public enum BytesSyntax {
    /// The largest byte string a scenario may spell (guards memory, not semantics).
    public static let maxLength: UInt64 = 1 << 30

    public struct Problem: Error, Hashable, Sendable { public var message: String }

    public static func parse(_ json: JSON) -> Result<[UInt8], Problem> {
        switch json {
        case .string(let hex):
            guard let b = hexBytes(hex) else { return .failure(Problem(message: "expected hex digits in pairs, e.g. \"aa55\"")) }
            return .success(b)
        case .object(let o):
            if let text = o["text"] {
                guard case .string(let s) = text, o.keys.count == 1 else { return .failure(Problem(message: "\"text\" takes a string and no other key")) }
                return .success(Array(s.utf8))
            }
            guard let lenJSON = o["len"], let len = NumberSyntax.parse(lenJSON) else {
                return .failure(Problem(message: "\"fill\" and \"pattern\" need \"len\" (a number)"))
            }
            guard len <= maxLength else { return .failure(Problem(message: "len \(len) is larger than \(maxLength)")) }
            if let fill = o["fill"] {
                guard o.keys.count == 2, let v = NumberSyntax.parse(fill), v <= 0xff else {
                    return .failure(Problem(message: "\"fill\" takes one byte value (0..255) beside \"len\""))
                }
                return .success([UInt8](repeating: UInt8(v), count: Int(len)))
            }
            if let pattern = o["pattern"] {
                guard o.keys.count == 2, case .string(let hex) = pattern, let p = hexBytes(hex), !p.isEmpty else {
                    return .failure(Problem(message: "\"pattern\" takes a non-empty hex string beside \"len\""))
                }
                return .success((0..<Int(len)).map { p[$0 % p.count] })
            }
            return .failure(Problem(message: "expected one of \"fill\", \"pattern\", \"text\""))
        default:
            return .failure(Problem(message: "expected a hex string or an object with \"fill\", \"pattern\" or \"text\""))
        }
    }

    static func hexBytes(_ s: String) -> [UInt8]? {
        let u = Array(s.utf8)
        guard u.count % 2 == 0 else { return nil }
        var out: [UInt8] = []
        out.reserveCapacity(u.count / 2)
        var i = 0
        while i < u.count {
            guard let hi = JSONParser.hexDigit(u[i]), let lo = JSONParser.hexDigit(u[i + 1]) else { return nil }
            out.append(hi << 4 | lo)
            i += 2
        }
        return out
    }

    /// A short human form: hex up to 32 bytes, else runs like "aa*2048 00*2048".
    public static func describe(_ bytes: [UInt8]) -> String {
        if bytes.isEmpty { return "\"\"" }
        if bytes.count <= 32 { return hex(bytes) }
        var runs: [(UInt8, Int)] = []
        for b in bytes {
            if let last = runs.last, last.0 == b {
                runs[runs.count - 1].1 += 1
            } else {
                runs.append((b, 1))
                if runs.count > 8 { break }
            }
        }
        if runs.count > 8 {
            return hex(Array(bytes.prefix(16))) + "... (\(bytes.count) bytes)"
        }
        return runs.map { hex([$0.0]) + "*\($0.1)" }.joined(separator: " ")
    }

    public static func hex(_ bytes: [UInt8]) -> String {
        let digits = Array("0123456789abcdef".utf8)
        var out: [UInt8] = []
        out.reserveCapacity(bytes.count * 2)
        for b in bytes {
            out.append(digits[Int(b >> 4)])
            out.append(digits[Int(b & 0xf)])
        }
        return String(decoding: out, as: UTF8.self)
    }
}

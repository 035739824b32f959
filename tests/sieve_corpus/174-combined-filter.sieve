# envelope: from=alice@example.org to=bob+lists@example.com message=messages/plain.eml
require ["fileinto", "imap4flags", "variables", "envelope", "subaddress", "relational", "comparator-i;ascii-numeric"];
if header :value "ge" :comparator "i;ascii-numeric" "x-spam-score" "10" {
  setflag "$Junk";
  fileinto "Junk";
  stop;
}
if envelope :detail :matches "to" "*" {
  set :lower "d" "${1}";
  fileinto :flags "\\Seen" "Lists/${d}";
} else {
  keep;
}

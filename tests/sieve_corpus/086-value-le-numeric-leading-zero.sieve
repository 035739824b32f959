# envelope: from=alice@example.org to=bob+lists@example.com message=messages/plain.eml
require ["fileinto", "relational", "comparator-i;ascii-numeric"];
if header :value "le" :comparator "i;ascii-numeric" "x-priority" "3" {
  fileinto "yes";
} else {
  fileinto "no";
}

# envelope: from=alice@example.org to=bob@example.com message=messages/large.eml
require ["fileinto", "relational", "comparator-i;ascii-numeric"];
if header :value "ge" :comparator "i;ascii-numeric" "x-spam-score" "10" {
  fileinto "yes";
} else {
  fileinto "no";
}

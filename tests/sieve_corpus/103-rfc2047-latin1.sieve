# envelope: from=alice@example.org to=francois@example.fr message=messages/encoded.eml
require ["fileinto"];
if header :contains "to" "François" {
  fileinto "yes";
} else {
  fileinto "no";
}
